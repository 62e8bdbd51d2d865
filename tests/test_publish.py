"""Publishing to the Hub: checks, staged layout and model card, loading back over HTTP."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from safetensors.torch import load_file, save_file

from sae_gba import GBATrainingSAE, GBATrainingSAEConfig
from sae_gba.cli import main
from sae_gba.publish import PublishError, publish
from tests.helpers import runner_dict, tiny_model, token_dataset

REPO_ID = "user/name"
COMMIT = hashlib.sha1(b"sae-gba test release").hexdigest()


def _train(sae_cfg: dict, out: Path) -> tuple[Path, object, torch.Tensor]:
    """Train a few steps on a tiny random model; return folder, training SAE, inputs."""
    torch.manual_seed(0)
    model = tiny_model()
    cfg = LanguageModelSAERunnerConfig.from_dict(
        runner_dict(sae_cfg, str(out), training_tokens=64 * 10)
    )
    cfg.logger.log_to_wandb = False
    sae = LanguageModelSAETrainingRunner(
        cfg, override_model=model, override_dataset=token_dataset(100)
    ).run()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    _, cache = model.run_with_cache(tokens, names_filter=cfg.hook_name)
    return out, sae, cache[cfg.hook_name].reshape(-1, 32).detach()


@pytest.fixture(scope="module")
def gba_run(tmp_path_factory):
    sae_cfg = {
        "architecture": "gba",
        "d_in": 32,
        "d_sae": 64,
        "n_groups": 2,
        "adaptation_interval": 5,
    }
    return _train(sae_cfg, tmp_path_factory.mktemp("runs") / "gba_run")


@pytest.fixture(scope="module")
def weighted_topk_run(tmp_path_factory):
    sae_cfg = {"architecture": "weighted_topk", "d_in": 32, "d_sae": 64, "k": 4}
    return _train(sae_cfg, tmp_path_factory.mktemp("runs") / "weighted_topk_run")


@pytest.fixture
def gba_copy(gba_run, tmp_path):
    return Path(shutil.copytree(gba_run[0], tmp_path / "copy"))


def _front_matter(readme: Path) -> dict:
    _, front, _ = readme.read_text().split("---\n", 2)
    return yaml.safe_load(front)


def test_dry_run__gba_folder_stages_the_from_pretrained_layout_and_a_card(
    gba_run, tmp_path
):
    report = publish([gba_run[0]], REPO_ID, dry_run=tmp_path / "stage")
    sae_id = "blocks.0.hook_resid_post__gba_64"
    assert report["sae_ids"] == [sae_id]
    stage = tmp_path / "stage"
    assert sorted(p.name for p in (stage / sae_id).iterdir()) == [
        "cfg.json",
        "runner_cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
    ]
    assert sorted(p.name for p in stage.iterdir()) == ["README.md", sae_id]
    front = _front_matter(stage / "README.md")
    assert front["library_name"] == "saelens"
    assert {"saelens", "gba"} <= set(front["tags"])
    assert "base_model" not in front  # tiny-random is not a Hub model
    (entry,) = front["saes"]
    assert entry["sae_id"] == sae_id and entry["model_name"] == "tiny-random"
    assert entry["hook_name"] == "blocks.0.hook_resid_post" and entry["width"] == 64
    assert entry["architecture"] == "jumprelu"
    assert entry["training_architecture"] == "gba"
    assert entry["training_settings"]["n_groups"] == 2
    assert entry["training_settings"]["gba_group_sizes"] == [32, 32]
    assert entry["l0"] > 0
    card = ModelCard.load(stage / "README.md")
    assert card.data.library_name == "saelens"
    assert f'SAE.from_pretrained(release="{REPO_ID}", sae_id="{sae_id}")' in card.text


class _HubFiles(BaseHTTPRequestHandler):
    """The Hub's file endpoints (``/{repo}/resolve/{revision}/{path}``) for one folder."""

    root: Path
    requests: list[tuple[str, str]]

    def do_HEAD(self):
        self._serve(send_body=False)

    def do_GET(self):
        self._serve(send_body=True)

    def _serve(self, send_body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self.requests.append((self.command, path))
        prefix = f"/{REPO_ID}/resolve/"
        if not path.startswith(prefix):
            return self._error("RepoNotFound")
        revision, _, filename = path[len(prefix) :].partition("/")
        if revision not in ("main", COMMIT):
            return self._error("RevisionNotFound")
        file = self.root / filename
        if ".." in filename or not file.is_file():
            return self._error("EntryNotFound")
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def _error(self, code: str) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@contextmanager
def _local_hub(root: Path):
    handler = type("Handler", (_HubFiles,), {"root": root, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()


LOAD_SCRIPT = """
import sys, torch
from sae_lens import SAE
torch.set_grad_enabled(False)
repo_id, sae_id, io_path = sys.argv[1:]
sae = SAE.from_pretrained(release=repo_id, sae_id=sae_id)
assert "sae_gba" not in sys.modules
io = torch.load(io_path, weights_only=True)
acts = sae.encode(io["x"])
print(type(sae).__name__, int((acts != 0).sum()),
      float((acts - io["acts"]).abs().max()),
      float((sae.decode(acts) - io["recons"]).abs().max()))
"""


def test_staged_release__loads_with_from_pretrained_through_hub_downloads(
    gba_run, tmp_path
):
    folder, sae, x = gba_run
    sae_id = publish([folder], REPO_ID, dry_run=tmp_path / "stage")["sae_ids"][0]
    acts = sae.encode(x).detach()
    torch.save(
        {"x": x, "acts": acts, "recons": sae.decode(acts).detach()}, tmp_path / "io.pt"
    )
    with _local_hub(tmp_path / "stage") as (endpoint, requests):
        env = {
            **{k: v for k, v in os.environ.items() if k != "HF_TOKEN"},
            "HF_ENDPOINT": endpoint,
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "hf_home"),
            "NO_PROXY": "127.0.0.1",
            "no_proxy": "127.0.0.1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "OMP_NUM_THREADS": "1",
        }
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                LOAD_SCRIPT,
                REPO_ID,
                sae_id,
                str(tmp_path / "io.pt"),
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=300,
            check=False,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    name, n_active, acts_err, recons_err = result.stdout.split()[-4:]
    assert name == "JumpReLUSAE" and int(n_active) > 0
    assert float(acts_err) < 1e-5 and float(recons_err) < 1e-5
    for filename in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        url = f"/{REPO_ID}/resolve/main/{sae_id}/{filename}"
        assert ("HEAD", url) in requests and ("GET", url) in requests
    cached = tmp_path / "hf_home/hub/models--user--name/snapshots" / COMMIT / sae_id
    assert (cached / "sae_weights.safetensors").is_file()


def test_dry_run__weighted_topk_folder_publishes_as_plain_topk(
    weighted_topk_run, gba_run, tmp_path
):
    folder, sae, x = weighted_topk_run
    report = publish([folder, gba_run[0]], REPO_ID, dry_run=tmp_path / "stage")
    sae_id = report["sae_ids"][0]
    assert sae_id == "blocks.0.hook_resid_post__weighted_topk_64"
    staged = tmp_path / "stage" / sae_id
    loaded = SAE.load_from_disk(staged)
    assert json.loads((staged / "cfg.json").read_text())["architecture"] == "topk"
    assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-5)
    assert torch.allclose(loaded(x), sae(x), atol=1e-5)
    entries = _front_matter(tmp_path / "stage/README.md")["saes"]
    assert [e["training_architecture"] for e in entries] == ["weighted_topk", "gba"]
    assert entries[0]["architecture"] == "topk"
    assert entries[0]["training_settings"]["input_weights_source"] == "variance"
    assert (staged / "input_weights.safetensors").is_file()


def test_eval_dir__saebench_key_metrics_go_into_the_card(gba_run, tmp_path):
    sae_id = "blocks.0.hook_resid_post__gba_64"
    core = {
        "eval_type_id": "core",
        "sae_lens_id": "custom",
        "eval_result_metrics": {
            "reconstruction_quality": {
                "explained_variance": 0.95,
                "explained_variance_legacy": 0.9012345678,
                "mse": 1.5,
            },
            "sparsity": {"l0": 30.5, "l1": 120.0},
            "model_behavior_preservation": {"kl_div_with_ablation": 5.0},
        },
    }
    absorption = {
        "eval_type_id": "absorption_first_letter",
        "eval_result_metrics": {"mean": {"mean_full_absorption_score": 0.004}},
    }
    evals = tmp_path / "evals"
    (evals / "gba_run").mkdir(parents=True)
    (evals / f"custom_{sae_id}_eval_results.json").write_text(json.dumps(core))
    (evals / "gba_run/absorption.json").write_text(json.dumps(absorption))
    (evals / "other_eval_results.json").write_text(
        json.dumps({**core, "sae_lens_id": "other"})
    )
    (evals / "notes.json").write_text("[1, 2]")
    report = publish([gba_run[0]], REPO_ID, dry_run=tmp_path / "stage", eval_dir=evals)
    assert report["unmatched_evals"] == [str(evals / "other_eval_results.json")]
    (entry,) = _front_matter(tmp_path / "stage/README.md")["saes"]
    assert entry["saebench"] == {
        "core": {
            "explained_variance_legacy": 0.901235,
            "explained_variance": 0.95,
            "mse": 1.5,
            "l0": 30.5,
            "l1": 120.0,
        },
        "absorption_first_letter": {"mean_full_absorption_score": 0.004},
    }


def test_card__names_the_hub_base_model_when_transformer_lens_knows_it(
    gba_copy, tmp_path
):
    cfg = json.loads((gba_copy / "cfg.json").read_text())
    cfg["metadata"]["model_name"] = "gemma-2-2b"
    (gba_copy / "cfg.json").write_text(json.dumps(cfg))
    publish([gba_copy], REPO_ID, revision="v1", dry_run=tmp_path / "stage")
    front = _front_matter(tmp_path / "stage/README.md")
    assert front["base_model"] == "google/gemma-2-2b"
    assert front["saes"][0]["model_name"] == "gemma-2-2b"
    assert "revision `v1`" in (tmp_path / "stage/README.md").read_text()


def test_refuses_a_native_training_checkpoint(tmp_path):
    sae = GBATrainingSAE(GBATrainingSAEConfig(d_in=8, d_sae=16, n_groups=2))
    sae.save_model(tmp_path / "ckpt")
    with pytest.raises(
        PublishError, match="architecture 'gba' is defined by the plugin"
    ):
        publish([tmp_path / "ckpt"], REPO_ID, dry_run=tmp_path / "stage")
    with pytest.raises(PublishError, match="save_inference_model"):
        publish([tmp_path / "ckpt"], REPO_ID, dry_run=tmp_path / "stage")
    assert not (tmp_path / "stage").exists()


@pytest.mark.parametrize("missing", ["cfg.json", "sae_weights.safetensors"])
def test_missing_files_are_named(gba_copy, tmp_path, missing):
    (gba_copy / missing).unlink()
    with pytest.raises(PublishError, match=f"has no {missing}"):
        publish([gba_copy], REPO_ID, dry_run=tmp_path / "stage")


def test_nan_weights_are_refused(gba_copy, tmp_path):
    weights = load_file(gba_copy / "sae_weights.safetensors")
    weights["W_dec"][3, 4] = float("nan")
    weights["threshold"][0] = float("inf")
    save_file(weights, gba_copy / "sae_weights.safetensors")
    with pytest.raises(PublishError) as error:
        publish([gba_copy], REPO_ID, dry_run=tmp_path / "stage")
    assert "W_dec has 1 NaN/Inf values of 2048" in str(error.value)
    assert "threshold has 1 NaN/Inf values" in str(error.value)


def test_weights_that_disagree_with_the_config_are_refused(gba_copy, tmp_path):
    cfg = json.loads((gba_copy / "cfg.json").read_text())
    (gba_copy / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 65}))
    with pytest.raises(
        PublishError, match=r"W_enc has shape \(32, 64\), expected \(32, 65\)"
    ):
        publish([gba_copy], REPO_ID, dry_run=tmp_path / "stage")


@pytest.mark.parametrize(
    "repo_id",
    [
        "name",
        "a/b/c",
        "user/bad name",
        "user/-name",
        "user/a..b",
        "user/x.git",
        "/name",
    ],
)
def test_bad_repo_ids_are_refused(gba_run, tmp_path, repo_id):
    with pytest.raises(PublishError, match="invalid Hub repo id"):
        publish([gba_run[0]], repo_id, dry_run=tmp_path / "stage")


def test_duplicate_sae_ids_and_a_used_staging_folder_are_refused(gba_run, tmp_path):
    with pytest.raises(PublishError, match="would both be published"):
        publish([gba_run[0], gba_run[0]], REPO_ID, dry_run=tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b/old.txt").write_text("x")
    with pytest.raises(PublishError, match="not an empty folder"):
        publish([gba_run[0]], REPO_ID, dry_run=tmp_path / "b")


class _RecordingApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, folder_path, **kwargs):
        files = sorted(
            str(p.relative_to(folder_path))
            for p in Path(folder_path).rglob("*")
            if p.is_file()
        )
        self.calls.append(("upload_folder", files, kwargs))
        return "https://huggingface.co/user/name/commit/abc"


def _no_login(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token")
    )


def test_missing_token_is_reported_before_anything_is_uploaded(
    gba_run, tmp_path, monkeypatch
):
    _no_login(monkeypatch, tmp_path)
    api = _RecordingApi()
    with pytest.raises(PublishError, match="no Hugging Face token: set HF_TOKEN"):
        publish([gba_run[0]], REPO_ID, api=api)
    assert api.calls == []


def test_upload__creates_the_repo_and_branch_and_uploads_one_folder(
    gba_run, tmp_path, monkeypatch
):
    _no_login(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    api = _RecordingApi()
    report = publish([gba_run[0]], REPO_ID, revision="v1", private=True, api=api)
    assert report["commit_url"] == "https://huggingface.co/user/name/commit/abc"
    (_, repo, create), (_, _, branch), (_, files, upload) = api.calls
    assert repo == REPO_ID and create["private"] is True and create["exist_ok"]
    assert branch["branch"] == "v1"
    sae_id = "blocks.0.hook_resid_post__gba_64"
    assert files == [
        "README.md",
        f"{sae_id}/cfg.json",
        f"{sae_id}/runner_cfg.json",
        f"{sae_id}/sae_weights.safetensors",
        f"{sae_id}/sparsity.safetensors",
    ]
    assert upload["repo_id"] == REPO_ID and upload["revision"] == "v1"


def test_cli__dry_run_and_clear_errors(gba_run, tmp_path, capsys):
    main(
        [
            "publish",
            str(gba_run[0]),
            "--repo-id",
            REPO_ID,
            "--dry-run",
            str(tmp_path / "stage"),
            "--sae-id-from",
            "folder",
        ]
    )
    out = capsys.readouterr().out
    assert "staged (not uploaded)" in out
    assert f'SAE.from_pretrained(release="{REPO_ID}", sae_id="gba_run")' in out
    assert (tmp_path / "stage/gba_run/cfg.json").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "publish",
                str(tmp_path / "nowhere"),
                "--repo-id",
                REPO_ID,
                "--dry-run",
                "x",
            ]
        )
    assert exit_info.value.code == 2
    assert "nowhere does not exist" in capsys.readouterr().err
