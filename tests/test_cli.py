"""The ``sae-gba`` command line: options generated from each command's config
dataclass, ``--sae KEY=VALUE``, and ``train`` and ``demo`` run for real at toy size
on the embedded Gemma-3-270M (nothing mocked)."""

import dataclasses
import json

import pytest
import torch
from sae_lens import SAE

from sae_gba.cli import COMMANDS, TRAIN_ARGS_FILE, main
from sae_gba.cli.options import field_help
from tests.helpers import cli_error

# Toy size on the embedded model: 4 windows of 128 tokens per forward pass, 4 of them
# buffered, 64 latents, 2 training steps of 512 tokens.
TOY = ["--d-sae", "64", "--training-tokens", "1024"]
TOY += ["--store-batch-size-prompts", "4", "--n-batches-in-buffer", "4"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """16 training windows of the embedded Wikipedia slice, saved with save_to_disk."""
    from sae_gba.embedded import embedded_token_dataset

    folder = tmp_path_factory.mktemp("data")
    embedded_token_dataset("train", 128).select(range(16)).save_to_disk(folder)
    return str(folder)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help__lists_every_option_with_a_sentence(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    helps = field_help(COMMANDS[name].options)
    for field in dataclasses.fields(COMMANDS[name].options):
        sentence = " ".join(helps[field.name].replace("``", "").split())
        assert len(sentence.split()) >= 2, field.name
        assert sentence.rstrip(".") in text, field.name
        if not field.metadata.get("positional"):
            assert f"--{field.name.replace('_', '-')}" in text


@pytest.mark.parametrize(
    ("sae", "message"),
    [
        (
            ["kk=1"],
            "--sae 'kk=1' is invalid: expected KEY=VALUE with KEY a field of "
            "GBATrainingSAEConfig: adaptation_interval, apply_b_dec_to_input,",
        ),
        (["n_groups"], "--sae 'n_groups' is invalid: expected KEY=VALUE"),
        (
            ["n_groups=two"],
            "--sae 'n_groups=two' is invalid: GBATrainingSAEConfig.n_groups takes "
            "an integer",
        ),
        (
            ["gate_bias_init=ones"],
            "--sae 'gate_bias_init=ones' is invalid: GBATrainingSAEConfig."
            "gate_bias_init takes one of zero, target_quantile",
        ),
        (
            ["gamma_plus=2"],
            "GBATrainingSAEConfig.gamma_plus=2.0 is invalid: must be in [0, 1]",
        ),
        (["d_sae=8"], "--sae 'd_sae=8' is invalid: expected KEY=VALUE"),
    ],
)
def test_sae_option__names_field_value_and_what_is_allowed(
    sae, message, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["train", "--preset", "embedded", "--out", str(out)]
    line = cli_error(capsys, [*argv, *(f"--sae={item}" for item in sae)])
    assert line.startswith(message), line
    assert not out.exists()


def test_sae_option__checked_against_the_chosen_architecture(tmp_path, capsys):
    argv = ["train", "--preset", "embedded", "--out", str(tmp_path / "r")]
    line = cli_error(capsys, [*argv, "--architecture", "topk", "--sae", "k=8.5"])
    assert line == "--sae 'k=8.5' is invalid: TopKTrainingSAEConfig.k takes an integer"
    line = cli_error(capsys, [*argv, "--sae", "k=8"])  # gba has no k
    assert "a field of GBATrainingSAEConfig" in line


def test_out_and_resume__exactly_one(tmp_path, capsys):
    line = cli_error(capsys, ["train", "--preset", "embedded"])
    assert (
        line == "--out OUT (a new run) or --resume OUT (an interrupted one) is required"
    )
    argv = ["train", "--out", str(tmp_path), "--resume", str(tmp_path)]
    assert cli_error(capsys, argv).startswith("--out and --resume cannot be combined")


def test_argparse_errors__exit_2_with_the_option_and_its_choices(capsys):
    line = cli_error(capsys, ["demo", "--lm-dtype", "int8"])
    assert "argument --lm-dtype: invalid choice: 'int8'" in line
    assert "'float32', 'bfloat16', 'float16'" in line
    line = cli_error(capsys, ["train", "--d-sae", "many"])
    assert "argument --d-sae: invalid int value: 'many'" in line


@pytest.mark.filterwarnings("ignore::UserWarning:sae_lens")
def test_train__runs_for_real_and_resumes_only_with_its_settings(
    small_data, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["train", "--preset", "embedded", "--out", str(out), *TOY]
    argv += ["--dataset-path", small_data, "--sae", "n_groups=2", "--sae", "k=1"]
    assert "a field of GBATrainingSAEConfig" in cli_error(capsys, argv)
    main(argv[:-2])
    assert f"wrote the SAE to {out}/sae" in capsys.readouterr().out
    saved = json.loads((out / TRAIN_ARGS_FILE).read_text())
    assert saved["sae"] == {"n_groups": 2} and saved["d_sae"] == 64
    assert saved["n_batches_in_buffer"] == 4
    cfg = json.loads((out / "sae" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"]) == ("jumprelu", 640, 64)
    assert cfg["metadata"]["gba_group_sizes"] == [32, 32]
    assert cfg["metadata"]["hook_name"] == "blocks.9.hook_resid_post"
    sae = SAE.load_from_disk(out / "sae")
    assert torch.isfinite(sae.W_dec).all() and not (out / "checkpoints").exists()
    # The finished run refuses --resume; changed settings are named.
    line = cli_error(capsys, ["train", "--resume", str(out), "--sae", "n_groups=4"])
    assert "--sae {'n_groups': 4} (the run has {'n_groups': 2})" in line
    line = cli_error(capsys, ["train", "--resume", str(out)])
    assert line.startswith(f"--resume {out}: the run is finished")


@pytest.mark.filterwarnings("ignore::UserWarning:sae_lens")
def test_demo__runs_for_real_at_toy_size(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--out", str(out), *TOY, "--eval-windows", "2", "--seed", "3"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["d_sae"] == 64 and summary["config"]["seed"] == 3
    assert summary["hook_name"] == "blocks.9.hook_resid_post"
    # The default 10 groups; an adaptation window is 5 steps of 512 tokens.
    assert [g["group"] for g in summary["groups"]] == list(range(10))
    targets = [g["target"] for g in summary["groups"]]
    assert targets == sorted(targets, reverse=True) and targets[-1] == 1e-4
    assert summary["tokens_per_adaptation_window"] == 5 * 512
    held_out = summary["held_out"]
    assert 0 < held_out["l0"] < 64 and held_out["eval_tokens"] == 2 * 127
    assert 0 <= summary["alive_fraction_last_100k_training_tokens"] <= 1
    assert (out / "firing_frequencies.png").stat().st_size > 1000
    page = (out / "latents" / "index.html").read_text()
    assert "sae-gba demo: GBA on Gemma-3-270M blocks.9.hook_resid_post" in page
    printed = capsys.readouterr().out
    assert f"wrote {out}/summary.json" in printed
    assert json.loads(printed[printed.index("{\n") : printed.index("\nwrote")]) == {
        "held_out": held_out,
        "groups": summary["groups"],
    }
    assert "already holds files" in cli_error(capsys, ["demo", "--out", str(out)])
