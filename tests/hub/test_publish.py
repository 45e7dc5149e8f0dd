"""`celltron publish` against a local stand-in for the Hugging Face Hub: the shared pretrained
model is published, then loaded by its repository id in a fresh process with the same outputs;
a second publish is refused without --force; --dry-run uploads nothing; the token never shows."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from celltron.cli import main
from tests.hub.hub_server import HubServer

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_celltrontest" + secrets.token_hex(12)

# the fresh process: load by repo id, run a fixed batch, save the logits
LOAD_BY_ID = """
import sys, torch
import celltron
from transformers import AutoModelForMaskedLM
from celltron.model_zoo.registry import load_pretrained, model_folder
model = load_pretrained(sys.argv[1]).eval()
plain = AutoModelForMaskedLM.from_pretrained(sys.argv[1]).eval()  # transformers' own Hub loading
generator = torch.Generator().manual_seed(0)
ids = torch.randint(5, model.config.vocab_size, (2, 12), generator=generator)
mask = torch.ones_like(ids)
mask[1, 9:] = 0
with torch.no_grad():
    torch.save({"celltron": model(input_ids=ids, attention_mask=mask).logits,
                "transformers": plain(input_ids=ids, attention_mask=mask).logits}, sys.argv[2])
print(model_folder(sys.argv[1]))
"""


@pytest.fixture
def hub(tmp_path):
    with HubServer(tmp_path / "hub_store", token=TOKEN) as server:
        yield server


@pytest.fixture
def online(hub, tmp_path, monkeypatch):
    """This test only: huggingface_hub online and pointed at the local Hub, with a private
    HF_HOME and the test token (tests/conftest.py keeps every other test offline). The client
    read its settings when first imported, so the constants are patched as well."""
    from huggingface_hub import constants

    env = hub.environment(tmp_path / "hf_home", TOKEN)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # no stray login on this machine may stand in for the test's token
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
    return env


def _logits(model_id: str, out: Path, env: dict) -> tuple[Path, subprocess.CompletedProcess]:
    run = subprocess.run(
        [sys.executable, "-c", LOAD_BY_ID, model_id, str(out)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return Path(run.stdout.strip().splitlines()[-1]), run


def _assert_no_token(tmp_path: Path, *texts: str) -> None:
    for text in texts:
        assert TOKEN not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_published_model_loads_by_repo_id_in_a_fresh_process(pretrained_geneformer, hub, online, tmp_path, capfd):
    import torch

    from celltron.model_zoo.registry import load_pretrained

    stage = tmp_path / "stage"  # the shared fixture folder stays as it is
    assert (
        main(["publish", str(pretrained_geneformer), "--repo-id", "lab/geneformer-debug", "--out", str(stage), "--private"]) == 0
    )
    printed = capfd.readouterr()
    assert "published" in printed.out and "lab/geneformer-debug" in printed.out
    assert hub.state.repo("model", "lab/geneformer-debug").private  # so the fresh process needs the token to read it

    remote = hub.repo_files("lab/geneformer-debug")
    local = {
        p.name: p.read_bytes() for p in stage.iterdir() if not p.name.startswith(".")
    }  # hidden files (celltron's marker) stay local
    assert set(remote) == set(local) | {".gitattributes"}
    assert all(remote[name] == content for name, content in local.items())
    meta = _front_matter(remote["README.md"].decode())
    assert meta["library_name"] == "celltron" and meta["license"] == "apache-2.0"
    assert {"single-cell", "geneformer"} <= set(meta["tags"])
    assert meta["celltron"]["corpus_cells"] > 0 and meta["datasets"]

    folder, run = _logits("lab/geneformer-debug", tmp_path / "hub_logits.pt", online)
    assert folder.is_relative_to(tmp_path / "hf_home")  # came through the Hub cache
    assert ("GET", "/lab/geneformer-debug/resolve/" + folder.name + "/model.safetensors") in hub.requests
    model = load_pretrained(pretrained_geneformer).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    fetched = torch.load(tmp_path / "hub_logits.pt")
    torch.testing.assert_close(fetched["celltron"], expected, rtol=0, atol=0)
    torch.testing.assert_close(fetched["transformers"][mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-5)
    _assert_no_token(tmp_path, printed.out, printed.err, run.stdout, run.stderr)


def test_second_publish_is_refused_without_force(pretrained_geneformer, hub, online, tmp_path, capfd, monkeypatch):
    from huggingface_hub import HfApi, constants

    args = ["publish", str(pretrained_geneformer), "--repo-id", "lab/gf", "--out", str(tmp_path / "stage")]
    assert main(args) == 0
    commits = hub.writes().count(("POST", "/api/models/lab/gf/commit/main"))
    assert main(args) == 2
    printed = capfd.readouterr()
    assert "lab/gf@main already holds" in printed.err and "--force" in printed.err
    assert hub.writes().count(("POST", "/api/models/lab/gf/commit/main")) == commits

    # the forced publish goes the LFS way (Xet off, large files over LFS): the Hub's other upload
    # path; it replaces the revision, so a file the model does not have goes
    api = HfApi()
    api.upload_file(path_or_fileobj=b"old notes", path_in_repo="notes.txt", repo_id="lab/gf")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    hub.state.lfs_threshold = 100_000
    assert main([*args, "--force", "--license", "mit", "--commit-message", "second version"]) == 0
    remote = hub.repo_files("lab/gf")
    assert "notes.txt" not in remote
    assert _front_matter(remote["README.md"].decode())["license"] == "mit"
    assert remote["model.safetensors"] == (pretrained_geneformer / "model.safetensors").read_bytes()
    assert any(path.endswith("/info/lfs/objects/batch") for _, path in hub.writes())

    # a new branch is not an overwrite: no --force needed; it holds exactly the model's files,
    # not what main held beside them
    api.upload_file(path_or_fileobj=b"main only", path_in_repo="notes.txt", repo_id="lab/gf")
    assert main([*args, "--revision", "v2"]) == 0
    assert set(hub.repo_files("lab/gf", "v2")) == set(remote)
    assert "notes.txt" in hub.repo_files("lab/gf")
    printed = capfd.readouterr()
    assert "lab/gf@v2" in printed.out
    _assert_no_token(tmp_path, printed.out, printed.err)


def test_dry_run_writes_the_card_and_uploads_nothing(pretrained_geneformer, hub, online, tmp_path, capfd):
    folder = tmp_path / "model"
    shutil.copytree(pretrained_geneformer, folder)
    evaluation = folder / "grn_eval" / "metrics.json"
    evaluation.parent.mkdir()
    evaluation.write_text(
        json.dumps(
            {
                "method": "embedding",
                "model": {"auprc": 0.31, "auprc_ratio": 1.8, "epr": 2.5},
                "baselines": {"abs_pearson": {"auprc": 0.2, "auprc_ratio": 1.1, "epr": 1.4}},
            }
        )
    )
    run_dir = pretrained_geneformer.parent
    assert main(["publish", str(folder), "--repo-id", "lab/dry", "--dry-run", "--run-dir", str(run_dir)]) == 0
    printed = capfd.readouterr().out
    assert hub.requests == []
    card = (folder / "README.md").read_text()
    assert card in printed
    for name in ("config.json", "model.safetensors", "vocab.json", "tokenizer_config.json", "README.md"):
        assert f"  {name}  (" in printed
    for section in (
        "## Training data",
        "## Tokenizer",
        "## Training configuration",
        "## Evaluation",
        "## Intended use",
        "## Limitations",
        "## How to load",
    ):
        assert section in card
    assert "Gene regulatory network inference" in card and "0.310" in card
    assert 'load_pretrained("lab/dry")' in card and "--model lab/dry" in card
    assert str(tmp_path) not in card and str(run_dir) not in card  # no local paths on a public card
    _assert_no_token(tmp_path, printed)


def test_a_checkpoint_is_exported_first(pretrained_geneformer, tmp_path, capfd):
    from safetensors.torch import load_file

    checkpoint = next((pretrained_geneformer.parent / "checkpoints").glob("step=*.ckpt"))
    out = tmp_path / "hub_folder"
    assert main(["publish", str(checkpoint), "--repo-id", "lab/from-ckpt", "--out", str(out), "--dry-run"]) == 0
    exported, reference = load_file(out / "model.safetensors"), load_file(pretrained_geneformer / "model.safetensors")
    assert exported.keys() == reference.keys() and all((exported[k] == reference[k]).all() for k in reference)
    assert "## Training configuration" in (out / "README.md").read_text()


def test_a_missing_token_stops_before_any_upload(pretrained_geneformer, hub, online, tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("HF_TOKEN")
    args = ["publish", str(pretrained_geneformer), "--repo-id", "lab/x", "--out", str(tmp_path / "stage")]
    assert main(args) == 2
    assert "HF_TOKEN" in capfd.readouterr().err
    assert main([*args, "--token-env", "LAB_HF_TOKEN"]) == 2
    assert "--token-env LAB_HF_TOKEN" in capfd.readouterr().err
    assert hub.requests == [] and not (tmp_path / "stage").exists()


def test_an_unknown_hub_id_is_a_clear_error(tmp_path):
    from celltron.model_zoo.registry import load_pretrained

    with pytest.raises(FileNotFoundError, match="no-such-lab/no-such-model: not a local folder"):
        load_pretrained("no-such-lab/no-such-model")  # offline here (tests/conftest.py): not in the cache
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_pretrained(tmp_path / "missing" / "deep" / "folder")


def test_the_card_names_a_hub_init_from_as_base_model(pretrained_geneformer, tmp_path):
    from celltron.hub.model_card import gather_facts

    (tmp_path / "init_from.txt").write_text("lab/geneformer-base@v1\n")
    assert gather_facts(pretrained_geneformer, tmp_path).base_model == "lab/geneformer-base"
    (tmp_path / "init_from.txt").write_text(f"{pretrained_geneformer}\n")  # a local folder is no base model to link
    assert gather_facts(pretrained_geneformer, tmp_path).base_model is None
