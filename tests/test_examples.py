"""Every script in examples/ runs as written, at toy size (environment variables),
in its own process: the GBA SAE trained by the first is evaluated with SAEBench and
read back for its top-activating tokens by the others."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TOY = {"EXAMPLE_TOKENS": "1024", "EXAMPLE_D_SAE": "64", "EXAMPLE_WINDOWS": "4"}


def _run(script: str, *args: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **TOY, **env},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_example_is_tested_and_short():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    tested = Path(__file__).read_text()
    assert scripts and all(f'"{name}"' in tested for name in scripts)
    for name in scripts:
        assert len((EXAMPLES / name).read_text().splitlines()) <= 60, name


@pytest.fixture(scope="module")
def gba_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("example") / "gba"
    printed = _run("train_gba.py", str(out))
    assert f"wrote {out}: a 64-latent SAE" in printed
    return out


def test_train_gba__writes_an_exported_jumprelu_sae(gba_folder):
    cfg = json.loads((gba_folder / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"]) == ("jumprelu", 640, 64)
    assert cfg["metadata"]["hook_name"] == "blocks.9.hook_resid_post"


def test_top_activations__prints_each_latents_top_tokens(gba_folder):
    printed = _run("top_activations.py", str(gba_folder), "2").splitlines()
    headers = [line for line in printed if line.startswith("latent ")]
    contexts = [line for line in printed if line.startswith("  ")]
    assert len(headers) == 2 and len(contexts) == 2 * 3
    rates = [float(h.split("fires on ")[1].split("%")[0]) for h in headers]
    assert rates == sorted(rates, reverse=True) and rates[0] > 0


def test_evaluate_saebench__core_summary_of_the_folder(gba_folder, tmp_path):
    printed = _run("evaluate_saebench.py", str(gba_folder), str(tmp_path / "eval"))
    assert "## Core" in printed and "frac_alive" in printed
    assert list((tmp_path / "eval" / "core").glob("*_eval_results.json"))


def test_train_weighted_topk__estimates_the_weights(tmp_path):
    printed = _run("train_weighted_topk.py", str(tmp_path / "w"))
    assert printed.startswith("weights from the variance: gamma in [")
    cfg = json.loads((tmp_path / "w" / "sae" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"]) == ("topk", 32)
    assert (tmp_path / "w" / "sae" / "input_weights.safetensors").is_file()


def test_synthetic_recovery__recovers_planted_features():
    printed = _run("synthetic_recovery.py", EXAMPLE_STEPS="150")
    frr = float(printed.split("FRR@0.9 ")[1].split(",")[0])
    assert frr >= 0.5, printed
