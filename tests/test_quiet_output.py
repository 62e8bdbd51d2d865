"""Known third-party warnings silenced in one place; ``--quiet`` hides every bar."""

import logging
import os
import subprocess
import sys
import warnings

import pytest
from tqdm.auto import tqdm

from sae_gba.cli import main
from sae_gba.known_warnings import known_warnings_silenced
from sae_gba.progress import progress_bars


def _warn_from(module: str, message: str) -> None:
    """Issue ``message`` as if from ``module`` (the filters match on the module)."""
    warnings.warn_explicit(message, UserWarning, f"{module}.py", 1, module=module)


def test_known_warnings__silenced_inside_only_and_nothing_else():
    known = (
        (
            "sae_lens.training.activations_store",
            "The training dataset contains "
            "fewer samples (4090) than the number of samples required (560000).",
        ),
        (
            "sae_lens.training.activations_store",
            "To copy construct from a tensor, "
            "it is recommended to use sourceTensor.detach().clone()",
        ),
        ("sae_lens.saes.sae", "\nThis SAE has non-empty model_from_pretrained_kwargs."),
        (
            "sae_lens.training.activations_store",
            "All samples in the training dataset "
            "have been exhausted, beginning new epoch.",
        ),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with known_warnings_silenced():
            for module, message in known:
                _warn_from(module, message)
            _warn_from("sae_lens.saes.sae", "something new")
            _warn_from("sae_gba.demo", "The training dataset contains fewer samples")
        _warn_from(*known[0])  # outside the block it shows again
    assert [str(w.message) for w in caught] == [
        "something new",
        "The training dataset contains fewer samples",
        known[0][1],
    ]


def test_known_log_messages__dropped_inside_only(caplog):
    logger = logging.getLogger("sae_lens")
    message = "You just passed in a model which will override the one specified"
    with caplog.at_level(logging.WARNING, logger="sae_lens"):
        with known_warnings_silenced():
            logger.warning(message)
            logger.warning("a real problem")
        logger.warning(message)
    assert [r.getMessage() for r in caplog.records] == ["a real problem", message]


def test_progress_bars__quiet_hides_every_bar_and_restores(capsys):
    assert "TQDM_DISABLE" not in os.environ
    with progress_bars(False):
        for _ in tqdm(range(3), desc="ours"):
            pass
        assert os.environ["TQDM_DISABLE"] == "1"
        # A worker process imports tqdm afresh and reads the setting.
        child = subprocess.run(
            [sys.executable, "-c", "from tqdm import tqdm; list(tqdm(range(3)))"],
            capture_output=True,
            text=True,
            check=True,
        )
    assert capsys.readouterr().err == "" and child.stderr == ""
    assert "TQDM_DISABLE" not in os.environ
    with progress_bars(True):
        for _ in tqdm(range(3), desc="shown"):
            pass
    err = capsys.readouterr().err
    assert "shown" in err and "3/3" in err


@pytest.mark.parametrize(
    ("target", "argv", "result"),
    [
        ("sae_gba_evals.lab.experiments.run_experiment", ["synth", "imbalanced"], {}),
        (
            "sae_gba_evals.bench.throughput.run_throughput",
            ["bench", "throughput"],
            {"acceptance": 1},
        ),
        ("sae_gba_evals.compare.run_compare", ["compare"], {"gba_vs_topk": ""}),
        ("sae_gba_evals.saebench.evaluate", ["eval", "SAE_DIR"], None),
    ],
)
def test_cli_quiet__hides_the_bars_of_long_commands(
    monkeypatch, tmp_path, target, argv, result
):
    summary = tmp_path / "summary.md"
    summary.write_text("")
    shown = []

    def fake(*args, **kwargs):
        bar = tqdm(total=1)
        # Commands whose own bars follow a progress argument get it too.
        shown.append((not bar.disable, kwargs.get("progress", not bar.disable)))
        bar.close()
        return result if result is not None else {"summary": str(summary)}

    monkeypatch.setattr(target, fake)
    if "SAE_DIR" in argv:  # eval checks its SAE folder before any work
        from sae_lens import SAE
        from sae_lens.saes.standard_sae import StandardSAEConfig

        sae_dir = tmp_path / "sae"
        SAE.from_dict(StandardSAEConfig(d_in=4, d_sae=8).to_dict()).save_model(sae_dir)
        argv = [str(sae_dir) if a == "SAE_DIR" else a for a in argv]
    out = ["--out", str(tmp_path / "out")]
    main([*argv, *out])
    main([*argv, *out, "--quiet"])
    assert shown == [(True, True), (False, False)]
