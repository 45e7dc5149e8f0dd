"""The `celltron` command line: what a user types, what they see, and the exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from celltron.cli import main


def test_build_info_validate(tmp_path, pbmc3k, capsys):
    out = tmp_path / "c"
    assert main(["corpus", "build", str(pbmc3k), "--out", str(out), "--no-progress", "--min-genes", "200",
                 "--weight", f"{pbmc3k.name}=0.5", "--shard-size-mb", "4"]) == 0
    assert "cells kept" in capsys.readouterr().out
    assert main(["corpus", "info", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sources"][0]["weight"] == 0.5 and summary["splits"]["train"]["n_shards"] >= 2
    assert main(["corpus", "info", str(out)]) == 0
    assert "genes:" in capsys.readouterr().out
    assert main(["corpus", "validate", str(out)]) == 0
    shard = json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"][0]["path"]
    (out / shard / "X" / "indptr" / "zarr.json").write_text("{}")
    assert main(["corpus", "validate", str(out)]) == 1
    assert shard in capsys.readouterr().err


def test_bad_input_exits_2_with_the_file_named(tmp_path, capsys):
    adata = ad.AnnData(sp.csr_matrix(np.full((5, 3), 0.5, dtype=np.float32)))
    adata.var_names = ["CD3E", "CD4", "MS4A1"]
    adata.write_h5ad(tmp_path / "normalised.h5ad")
    assert main(["corpus", "build", str(tmp_path / "normalised.h5ad"), "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "normalised.h5ad" in err and "--layer" in err
    assert not (tmp_path / "c").exists()


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "celltron"
    result = subprocess.run([str(script), "corpus", "build", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--val-fraction" in result.stdout


def test_build_with_a_config_file_and_overriding_flags(tmp_path, pbmc4k, capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "corpus" / "pbmc.yaml"
    out = tmp_path / "c"
    assert main(["corpus", "build", str(pbmc4k), "--out", str(out), "--config", str(config), "--seed", "5", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["seed"] == 5 and manifest["build"]["min_genes"] == 200
    assert manifest["build"]["obs_keys"] == ["Annotation"] and "Annotation" in manifest["obs_categories"]
    assert main(["corpus", "build", str(pbmc4k), "--out", str(tmp_path / "d"), "--obs-keys", "dataset", "--no-progress"]) == 2
    assert "writes these columns itself" in capsys.readouterr().err


def test_a_user_error_raised_in_a_dataloader_worker_prints_one_line(tmp_path, monkeypatch, capsys):
    """DataLoader workers re-raise their error with the worker's traceback in the message; the CLI
    still prints only the user's one line."""
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from celltron import cli
    from celltron.errors import DataIntegrityError

    class Damaged(IterableDataset):
        def __iter__(self):
            raise DataIntegrityError("shard-00000.zarr: block of cells 0-65 is damaged; run `celltron corpus validate`")
            yield torch.zeros(1)

    def read_all(args):
        for _ in DataLoader(Damaged(), num_workers=1, batch_size=None):
            pass

    monkeypatch.setattr(cli, "_models", read_all)
    assert cli.main(["models"]) == 2
    err = capsys.readouterr().err
    assert err == "celltron: error: shard-00000.zarr: block of cells 0-65 is damaged; run `celltron corpus validate`\n"
