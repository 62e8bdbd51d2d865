"""Misuse and interruption: one-line errors before any work, exact resume after
SIGKILL and Ctrl-C, nothing half-written, no silent garbage.

Command-line faults run the installed ``sae-gba`` (a real process: exit status, one
line on stderr, no traceback, seconds) or ``main(argv)`` with its exit status and
message checked; training faults run SAELens's own trainer and runner on tiny models.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from sae_lens import SAE, LanguageModelSAERunnerConfig
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from safetensors.torch import load_file, save_file

from sae_gba.atomic import write_text_atomically
from sae_gba.cli import TRAIN_FIELDS, main
from sae_gba.gba_sae import GBATrainingSAE, GBATrainingSAEConfig
from sae_gba.loading import verify_sae_folder
from sae_gba.presets import GEMMA_2_2B, check_dataset_size
from sae_gba.training import (
    CheckpointedFit,
    ResumableRunner,
    TensorDataProvider,
    latest_checkpoint,
    make_trainer,
)
from sae_gba.weighted_sae import WeightedTopKTrainingSAE, WeightedTopKTrainingSAEConfig
from tests.helpers import cli_error, runner_dict, tiny_model, token_dataset

SAE_GBA = str(Path(sys.executable).with_name("sae-gba"))
TESTS = Path(__file__).parent


def _run_cli(*argv: str, env: dict | None = None) -> tuple[int, str, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [SAE_GBA, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    return done.returncode, done.stderr, time.perf_counter() - start


def _one_line_error(stderr: str, command: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"sae-gba {command}: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# ------------------------------------------- the bad commands, as a user runs them


def test_output_under_a_file_fails_in_one_line_at_once(tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"
    code, err, seconds = _run_cli("train", "--preset", "embedded", "--out", str(out))
    line = _one_line_error(err, "train")
    assert code == 2 and seconds < 5
    assert f"--out {out} lies under the file {tmp_path / 'file'}" in line


def test_gemma_preset_without_local_weights_says_how_to_get_them(tmp_path):
    out = str(tmp_path / "run")
    empty_cache = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code, err, seconds = _run_cli(
        "train", "--preset", "gemma-2-2b", "--out", out, env=empty_cache
    )
    line = _one_line_error(err, "train")
    assert code == 2 and seconds < 5
    assert "needs the model's weights on this machine: pass --model-path" in line
    assert "hf download google/gemma-2-2b" in line
    assert not Path(out).exists()  # refused before anything was made


def test_synth_with_zero_seeds_fails_before_starting(tmp_path):
    out = tmp_path / "imbalanced.json"
    code, err, seconds = _run_cli(
        "synth", "imbalanced", "--seeds", "0", "--out", str(out)
    )
    assert code == 2 and seconds < 5
    assert "--seeds 0 is invalid: must be >= 1" in _one_line_error(err, "synth")
    assert not out.exists()


def test_help_is_fast_and_loads_no_heavy_library():
    for argv in (["--help"], ["train", "--help"], ["demo", "--help"]):
        start = time.perf_counter()
        done = subprocess.run([SAE_GBA, *argv], capture_output=True, timeout=60)
        assert done.returncode == 0 and time.perf_counter() - start < 1.5, argv
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, sae_gba.cli; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "sae_gba.demo" in loaded
    for heavy in ("'torch'", "'sae_lens'", "'transformers'", "'datasets'"):
        assert heavy not in loaded


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "file").write_text("x")
    argv = ("train", "--preset", "embedded", "--out", str(tmp_path / "file" / "x"))
    code, err, _ = _run_cli(*argv, env={"SAE_GBA_DEBUG": "1"})
    assert code == 2 and "Traceback" in err and "UsageError" in err
    code, err, _ = _run_cli("--debug", *argv)
    assert code == 2 and "Traceback" in err


# ------------------------------------------------------------------ more misuse


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    (tmp_path / "old.txt").write_text("x")
    line = cli_error(capsys, ["train", "--preset", "embedded", "--out", str(tmp_path)])
    assert "already holds files; pass --resume" in line and "--overwrite" in line
    line = cli_error(capsys, ["compare", "--out", str(tmp_path)])
    assert "pass --resume to keep its finished SAEs and evals" in line
    line = cli_error(capsys, ["demo", "--out", str(tmp_path)])
    assert "already holds files" in line


def test_resume_of_a_missing_or_finished_run_is_refused(tmp_path, capsys):
    line = cli_error(capsys, ["train", "--resume", str(tmp_path / "none")])
    assert "no sae-gba train run there" in line
    (tmp_path / "sae").mkdir()
    saved = {**dict.fromkeys(TRAIN_FIELDS), "preset": "embedded", "device": "cpu"}
    (tmp_path / "train_args.json").write_text(json.dumps(saved))
    line = cli_error(capsys, ["train", "--resume", str(tmp_path)])
    assert "the run is finished" in line and "--overwrite" in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--d-sae", "0"], "--d-sae 0 is invalid: must be >= 1"),
        (
            ["--training-tokens", "100"],
            "--training-tokens 100 is invalid: must be >= 512",
        ),
        (["--layer", "-1"], "--layer -1 is invalid: must be >= 0"),
        (["--device", "cuda:7"], "--device cuda:7: this machine has"),
        (["--device", "gpu"], "--device 'gpu' is not a torch device"),
        (["--architecture", "relu"], "'relu' is not a training architecture; known:"),
        (["--model-path", "m"], "the embedded preset's model ships with the package"),
        (["--dataset-path", "nowhere"], "--dataset-path nowhere is not a folder"),
    ],
)
def test_bad_train_options_are_named(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    line = cli_error(
        capsys, ["train", "--preset", "embedded", "--out", str(out), *argv]
    )
    assert message in line
    assert not out.exists()


def test_known_architectures_are_listed(tmp_path, capsys):
    argv = ["train", "--preset", "embedded", "--out", str(tmp_path / "r")]
    line = cli_error(capsys, [*argv, "--architecture", "gbaa"])
    assert "gba, jumprelu" in line and "weighted_gba" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, capsys):
    tmp_path.chmod(0o555)
    try:
        line = cli_error(
            capsys, ["synth", "imbalanced", "--out", str(tmp_path / "x" / "r.json")]
        )
    finally:
        tmp_path.chmod(0o755)
    assert "cannot be written (Permission denied)" in line


def test_read_only_output_folder_as_root_too(tmp_path, capsys, monkeypatch):
    """The same refusal where the write itself fails (as for root on a read-only mount)."""

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.TemporaryFile", refuse)
    line = cli_error(capsys, ["synth", "imbalanced", "--out", str(tmp_path / "r.json")])
    assert "cannot be written (Read-only file system); choose another place" in line


# ------------------------------------------------------------- SAE folder checks


def _standard_folder(path: Path) -> Path:
    StandardSAE(StandardSAEConfig(d_in=8, d_sae=16)).save_model(path)
    return path


def _weighted_folder(path: Path) -> Path:
    sae = WeightedTopKTrainingSAE(WeightedTopKTrainingSAEConfig(d_in=8, d_sae=16, k=4))
    sae.set_input_weights(torch.arange(1.0, 9.0))
    sae.save_inference_model(path)
    return path


def _publish_error(capsys, folder: Path, tmp_path: Path) -> str:
    argv = ["publish", str(folder), "--repo-id", "user/saes"]
    return cli_error(capsys, [*argv, "--dry-run", str(tmp_path / "stage")])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated", "input_weights.safetensors is not a readable safetensors file"),
        ("nan", "input_weights.safetensors: gamma has 2 NaN/Inf values of 8"),
        ("missing", "input_weights.safetensors is missing"),
        ("wrong_length", "gamma has shape (7,), expected (8,)"),
        ("negative", "gamma has 1 entries <= 0 of 8"),
    ],
)
def test_publish_refuses_broken_input_weights(tmp_path, capsys, damage, message):
    folder = _weighted_folder(tmp_path / "wsae")
    path = folder / "input_weights.safetensors"
    gamma = load_file(path)["gamma"]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "nan":
        gamma[[1, 5]] = float("nan")
        save_file({"gamma": gamma}, path)
    elif damage == "missing":
        path.unlink()
    elif damage == "wrong_length":
        save_file({"gamma": gamma[:7].contiguous()}, path)
    else:
        gamma[0] = -1.0
        save_file({"gamma": gamma}, path)
    assert message in _publish_error(capsys, folder, tmp_path)
    assert not (tmp_path / "stage").exists()


def test_intact_weighted_folder_publishes(tmp_path, capsys):
    folder = _weighted_folder(tmp_path / "wsae")
    main(
        [
            "publish",
            str(folder),
            "--repo-id",
            "user/saes",
            "--dry-run",
            str(tmp_path / "s"),
        ]
    )
    assert "staged (not uploaded)" in capsys.readouterr().out
    staged = next((tmp_path / "s").glob("*/input_weights.safetensors"))
    assert load_file(staged)["gamma"].shape == (8,)


def test_wrong_dtype_weights_are_named(tmp_path, capsys):
    folder = _standard_folder(tmp_path / "sae")
    weights = load_file(folder / "sae_weights.safetensors")
    weights["W_enc"] = weights["W_enc"].round().to(torch.int32)
    save_file(weights, folder / "sae_weights.safetensors")
    line = cli_error(capsys, ["eval", str(folder), "--out", str(tmp_path / "out")])
    assert (
        "sae_weights.safetensors: W_enc has dtype torch.int32, expected float" in line
    )


def test_nan_weights_are_named_by_eval(tmp_path, capsys):
    folder = _standard_folder(tmp_path / "sae")
    weights = load_file(folder / "sae_weights.safetensors")
    weights["b_enc"][3] = float("inf")
    save_file(weights, folder / "sae_weights.safetensors")
    line = cli_error(capsys, ["eval", str(folder), "--out", str(tmp_path / "out")])
    assert "b_enc has 1 NaN/Inf values of 16" in line


def test_configs_from_other_sae_lens_versions(tmp_path):
    folder = _standard_folder(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    # SAELens 5's fields: SAELens 6 still reads them, so the folder is fine.
    old = {
        **{k: cfg[k] for k in ("architecture", "d_in", "d_sae", "dtype", "device")},
        "hook_name": "blocks.0.hook_resid_pre",
        "hook_layer": 0,
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": "5.0.0",
    }
    (folder / "cfg.json").write_text(json.dumps(old))
    assert verify_sae_folder(folder)["d_sae"] == 16
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "topk_v9"}))
    with pytest.raises(ValueError, match="'topk_v9' is not registered with SAELens"):
        verify_sae_folder(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_sae": "16"}))
    with pytest.raises(ValueError, match="d_sae='16' is invalid.*another SAELens"):
        verify_sae_folder(folder)


# --------------------------------------------------------- nothing half-written


def test_failing_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_text_atomically(tmp_path / "result.json", '{"old": 1}')

    def disk_full(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomically(path, '{"new": 2}')
    monkeypatch.undo()
    assert path.read_text() == '{"old": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.parametrize("fault", ["disk_full", "ctrl_c"])
def test_interrupted_publish_stages_nothing(tmp_path, capsys, monkeypatch, fault):
    folder = _weighted_folder(tmp_path / "wsae")
    copied = []

    def copy_then_fail(src, dst):
        if copied:
            if fault == "ctrl_c":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, "No space left on device")
        copied.append(shutil.copyfile(src, dst))

    monkeypatch.setattr("shutil.copy2", copy_then_fail)
    argv = ["publish", str(folder), "--repo-id", "user/saes"]
    argv += ["--dry-run", str(tmp_path / "stage")]
    line = cli_error(capsys, argv, 130 if fault == "ctrl_c" else 1)
    assert ("interrupted" if fault == "ctrl_c" else "No space left on device") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wsae"]  # no stage, no tmp


def test_a_failed_final_save_leaves_the_previous_sae(tmp_path, monkeypatch):
    out = _standard_folder(tmp_path / "sae")
    runner = object.__new__(ResumableRunner)  # only save_final_sae is exercised
    sae = WeightedTopKTrainingSAE(WeightedTopKTrainingSAEConfig(d_in=8, d_sae=16, k=4))

    def half_written(self, path):
        Path(path).mkdir(parents=True)
        (Path(path) / "cfg.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(WeightedTopKTrainingSAE, "save_inference_model", half_written)
    with pytest.raises(OSError):
        runner.save_final_sae(sae, str(out))
    assert verify_sae_folder(out)["architecture"] == "standard"


# ------------------------------------------------------------------ data guards


def test_empty_and_short_datasets_say_how_many_tokens(tmp_path):
    short = Dataset.from_dict({"tokens": [[2, 5, 6]] * 3})
    with pytest.raises(ValueError, match=r"has 3 rows \(9 tokens\); one model batch"):
        check_dataset_size(short, GEMMA_2_2B, "data")
    with pytest.raises(ValueError, match="8 windows of 1024 tokens"):
        check_dataset_size(short, GEMMA_2_2B, "data")
    with pytest.raises(ValueError, match="data has no rows"):
        check_dataset_size(Dataset.from_dict({"text": []}), GEMMA_2_2B, "data")


def test_near_constant_first_batch_is_refused():
    sae = GBATrainingSAE(GBATrainingSAEConfig(d_in=16, d_sae=32, n_groups=2))
    x = torch.ones(64, 16) * 3 + 1e-6 * torch.randn(64, 16)
    with pytest.raises(ValueError, match=r"rows are \(nearly\) constant"):
        sae._initialize_from_batch(x)
    sae._initialize_from_batch(torch.randn(64, 16) + 3)  # varied rows are fine
    assert sae.input_scale > 0


def test_near_constant_weight_estimation_is_refused():
    sae = WeightedTopKTrainingSAE(
        WeightedTopKTrainingSAEConfig(
            d_in=8, d_sae=16, k=4, weight_estimation_batches=1
        )
    )
    with pytest.raises(ValueError, match=r"\(nearly\) constant"):
        sae._accumulate_variance(5 + 1e-6 * torch.randn(32, 8))


def test_nan_activations_stop_training_at_their_step(tmp_path):
    data = torch.randn(64, 8)
    data[40:43, 2] = float("nan")  # rows 40-42: the sixth batch of 8, in order
    provider = TensorDataProvider(data, 8)
    provider._order = torch.arange(64)  # unshuffled, so the step is known
    sae = WeightedTopKTrainingSAE(WeightedTopKTrainingSAEConfig(d_in=8, d_sae=16, k=4))
    trainer = make_trainer(sae, provider, total_tokens=64, batch_size=8)
    fit = CheckpointedFit(trainer, provider, tmp_path)
    with pytest.raises(
        ValueError, match="training step 5 has 3 NaN/Inf values out of 64"
    ):
        fit.fit()


# -------------------------------------------------------- interruption and resume


class _CtrlCAtStep(TensorDataProvider):
    """Sends this process SIGINT when the trainer asks for the batch of one step."""

    def __init__(self, *args, trainer=None, step: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.trainer, self.step = trainer, step

    def __next__(self) -> torch.Tensor:
        if self.trainer is not None and self.trainer.n_training_steps == self.step:
            os.kill(os.getpid(), signal.SIGINT)
        return super().__next__()


def _gba_trainer(interrupt_at: int | None = None):
    data = torch.randn(512, 16, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    sae = GBATrainingSAE(
        GBATrainingSAEConfig(d_in=16, d_sae=32, n_groups=2, adaptation_interval=3)
    )
    provider = _CtrlCAtStep(data, 32, seed=0)
    trainer = make_trainer(sae, provider, total_tokens=32 * 40, batch_size=32)
    if interrupt_at is not None:
        provider.trainer, provider.step = trainer, interrupt_at
    return trainer, provider


def test_ctrl_c_writes_a_checkpoint_and_resume_is_exact(tmp_path):
    trainer, _ = _gba_trainer()
    expected = {k: v.clone() for k, v in trainer.fit().state_dict().items()}

    trainer, provider = _gba_trainer(interrupt_at=17)
    with pytest.raises(KeyboardInterrupt):
        CheckpointedFit(trainer, provider, tmp_path, interval_s=3600).fit()
    # Step 17 finished, then the checkpoint was written before the next one.
    assert latest_checkpoint(tmp_path).name == "step_000000018"

    trainer, provider = _gba_trainer()
    fit = CheckpointedFit(trainer, provider, tmp_path)
    fit.resume()
    assert trainer.n_training_steps == 18
    resumed = fit.fit().state_dict()
    assert set(resumed) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-5)


def tiny_runner(out: Path, resume: bool, interval_s: float = 0.0) -> ResumableRunner:
    """A weighted GBA run on a tiny model: 120 steps, so several adaptations, the
    weight estimation, dataset epochs and mixing-buffer refills all happen."""
    torch.manual_seed(0)
    sae = {
        "architecture": "weighted_gba",
        "d_in": 32,
        "d_sae": 64,
        "n_groups": 2,
        "adaptation_interval": 3,
        "weight_estimation_batches": 3,
    }
    cfg = runner_dict(sae, str(Path(out) / "sae"), training_tokens=64 * 120)
    return ResumableRunner(
        LanguageModelSAERunnerConfig.from_dict(cfg),
        checkpoint_dir=Path(out) / "checkpoints",
        resume=resume,
        checkpoint_interval_s=interval_s,
        override_model=tiny_model(),
        override_dataset=token_dataset(100),
    )


_KILLED_RUN = (
    "import sys; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
    "from tests.test_faults import tiny_runner; "
    "tiny_runner(Path(sys.argv[1]), resume=False).run()"
)


def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, str(out), str(TESTS.parent)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            latest = latest_checkpoint(out / "checkpoints")
            if latest is not None and int(latest.name.split("_")[1]) >= 15:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL  # killed mid-run, not finished
    assert not (out / "sae").exists()
    killed_at = int(latest_checkpoint(out / "checkpoints").name.split("_")[1])
    assert 15 <= killed_at < 120

    tiny_runner(out, resume=True).run()
    tiny_runner(tmp_path / "reference", resume=False, interval_s=3600).run()
    for name in ("sae_weights.safetensors", "input_weights.safetensors"):
        resumed = load_file(out / "sae" / name)
        reference = load_file(tmp_path / "reference" / "sae" / name)
        assert set(resumed) == set(reference)
        for key, value in reference.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-5)
    assert SAE.load_from_disk(out / "sae").cfg.d_sae == 64


def test_resume_under_another_configuration_names_the_fields(tmp_path):
    def config(**overrides):
        sae = {"architecture": "gba", "d_in": 32, "d_sae": 64, **overrides}
        return LanguageModelSAERunnerConfig.from_dict(runner_dict(sae, "out"))

    checkpoint = tmp_path / "step_000000010"
    checkpoint.mkdir()
    (checkpoint / "runner_cfg.json").write_text(json.dumps(config().to_dict()))
    changed = config(d_sae=128, n_groups=4)
    with pytest.raises(ValueError) as error:
        ResumableRunner(changed, checkpoint_dir=tmp_path, resume=True)
    message = str(error.value)
    assert "it was written with another configuration" in message
    assert "sae.d_sae: 64 -> 128" in message and "sae.n_groups: 10 -> 4" in message
