"""Every script in examples/ runs as written, at toy size (environment variables):
the GBA SAE trained by the first is evaluated with SAEBench and read back for its
top-activating tokens by the others.

The scripts run in this process (``runpy``, as ``python SCRIPT ARGS`` would) and
share the embedded model's loads: each dtype is loaded from its GGUF file once.
"""

import io
import json
import runpy
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from sae_gba.lm import models

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TOY = {"EXAMPLE_TOKENS": "1024", "EXAMPLE_D_SAE": "64", "EXAMPLE_WINDOWS": "4"}


@pytest.fixture(scope="module")
def run_example():
    """Runs ``examples/SCRIPT ARGS`` with the toy settings; returns its output."""
    load = models.load_model
    loaded = {}

    def load_once(name: str, *args, **kwargs):
        key = (name, *args, *sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in loaded:
            loaded[key] = load(name, *args, **kwargs)
        return loaded[key]

    def run(script: str, *args: str, **env: str) -> str:
        out = io.StringIO()
        with pytest.MonkeyPatch.context() as patch, redirect_stdout(out):
            patch.setattr(models, "load_model", load_once)
            patch.setattr(sys, "argv", [script, *args])
            for name, value in {**TOY, **env}.items():
                patch.setenv(name, value)
            runpy.run_path(str(EXAMPLES / script), run_name="__main__")
        return out.getvalue()

    return run


def test_every_example_is_tested_and_short():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    tested = Path(__file__).read_text()
    assert scripts and all(f'"{name}"' in tested for name in scripts)
    for name in scripts:
        assert len((EXAMPLES / name).read_text().splitlines()) <= 60, name


@pytest.fixture(scope="module")
def gba_folder(tmp_path_factory, run_example):
    out = tmp_path_factory.mktemp("example") / "gba"
    printed = run_example("train_gba.py", str(out))
    assert f"wrote {out}: a 64-latent SAE" in printed
    return out


def test_train_gba__writes_an_exported_jumprelu_sae(gba_folder):
    cfg = json.loads((gba_folder / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"]) == ("jumprelu", 640, 64)
    assert cfg["metadata"]["hook_name"] == "blocks.9.hook_resid_post"


def test_top_activations__prints_each_latents_top_tokens(gba_folder, run_example):
    printed = run_example("top_activations.py", str(gba_folder), "2").splitlines()
    headers = [line for line in printed if line.startswith("latent ")]
    contexts = [line for line in printed if line.startswith("  ")]
    assert len(headers) == 2 and len(contexts) == 2 * 3
    rates = [float(h.split("fires on ")[1].split("%")[0]) for h in headers]
    assert rates == sorted(rates, reverse=True) and rates[0] > 0


def test_evaluate_saebench__core_summary_of_the_folder(
    gba_folder, tmp_path, run_example
):
    printed = run_example(
        "evaluate_saebench.py", str(gba_folder), str(tmp_path / "eval")
    )
    assert "## Core" in printed and "frac_alive" in printed
    assert list((tmp_path / "eval" / "core").glob("*_eval_results.json"))


def test_train_weighted_topk__estimates_the_weights(tmp_path, run_example):
    printed = run_example("train_weighted_topk.py", str(tmp_path / "w"))
    assert "weights from the variance: gamma in [" in printed
    cfg = json.loads((tmp_path / "w" / "sae" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"]) == ("topk", 32)
    assert (tmp_path / "w" / "sae" / "input_weights.safetensors").is_file()


def test_synthetic_recovery__recovers_planted_features(run_example):
    printed = run_example("synthetic_recovery.py", EXAMPLE_STEPS="150")
    frr = float(printed.split("FRR@0.9 ")[1].split(",")[0])
    assert frr >= 0.5, printed
