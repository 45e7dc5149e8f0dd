"""The `celltron` command line: what a user types, what they see, and the exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from celltron.cli import main


def test_build_info_validate(tmp_path, pbmc3k, capsys):
    out = tmp_path / "c"
    assert (
        main(
            [
                "corpus",
                "build",
                str(pbmc3k),
                "--out",
                str(out),
                "--no-progress",
                "--min-genes",
                "200",
                "--weight",
                f"{pbmc3k.name}=0.5",
                "--shard-size-mb",
                "4",
            ]
        )
        == 0
    )
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


def test_a_config_error_prints_one_line_and_exits_2(tmp_path, capsys):
    """`celltron grn` without --model or --truth is the user's mistake (a ConfigError): one line naming both flags."""
    assert main(["grn", "--data", str(tmp_path / "lab.h5ad"), "--out", str(tmp_path / "grn")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "celltron: error: celltron grn: give --model (to infer edges) and/or --truth (to score them beside the baselines)\n"
    )


def test_a_missing_input_prints_one_line_and_exits_2(tmp_path, capsys):
    """A path that does not exist is a MissingInputError (also a FileNotFoundError): one line, no traceback."""
    missing = tmp_path / "no-such.tsv"
    assert (
        main(
            [
                "evaluate-embedding",
                "--data",
                str(missing),
                "--key",
                "X_celltron",
                "--label-key",
                "cell_type",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err == f"celltron: error: --data {missing}: no such file\n"


def _raising(error: BaseException):
    def list_models():
        raise error

    return list_models


def _celltron_errors():
    from celltron.corpus.genes import GeneMappingError
    from celltron.corpus.schema import CorpusFormatError
    from celltron.errors import CheckpointError, ConfigError, DataIntegrityError, InputError, OutputExistsError, UserError
    from celltron.hub.publish import PublishError
    from celltron.inputs import MissingInputError

    return [
        UserError,
        ConfigError,
        InputError,
        DataIntegrityError,
        CheckpointError,
        OutputExistsError,
        MissingInputError,
        CorpusFormatError,
        GeneMappingError,
        PublishError,
    ]


def test_every_celltron_error_class_is_a_one_line_user_error(monkeypatch, capsys):
    import celltron.model_zoo

    for error_class in _celltron_errors():
        monkeypatch.setattr(celltron.model_zoo, "list_models", _raising(error_class(f"x.h5ad: {error_class.__name__}; fix it")))
        assert main(["models"]) == 2, error_class
        assert capsys.readouterr().err == f"celltron: error: x.h5ad: {error_class.__name__}; fix it\n"


def test_a_bug_is_not_caught_so_its_traceback_shows(monkeypatch, capsys):
    """A plain ValueError, KeyError, FileNotFoundError or FileExistsError from celltron's code is a bug, not the user's
    mistake: main() lets it propagate (Python prints its traceback, exit code 1) instead of a one-line 'error:'."""
    import celltron.model_zoo

    bugs = [
        ValueError("could not broadcast input array from shape (3,) into shape (4,)"),
        KeyError("n_counts"),
        FileNotFoundError(2, "No such file or directory", "/internal/cache.json"),
        FileExistsError("/tmp/partial"),
        TypeError("unsupported operand type(s)"),
    ]
    for bug in bugs:
        monkeypatch.setattr(celltron.model_zoo, "list_models", _raising(bug))
        with pytest.raises(type(bug)) as caught:
            main(["models"])
        assert caught.value is bug
        assert "celltron: error:" not in capsys.readouterr().err


def test_a_bug_in_a_verb_shows_its_traceback_from_the_console_script(tmp_path):
    """End to end: the installed script exits 1 with Python's traceback for a bug, not a one-line user error."""
    script = tmp_path / "bug.py"
    script.write_text(
        "import sys\nimport celltron.model_zoo\nfrom celltron.cli import main\n\n"
        "def list_models():\n    raise ValueError('internal state went wrong')\n\n"
        "celltron.model_zoo.list_models = list_models\nsys.exit(main(['models']))\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "ValueError: internal state went wrong" in result.stderr
    assert "celltron: error:" not in result.stderr


@pytest.mark.parametrize("missing", ["--drug-list", "--smiles"])
def test_a_missing_file_a_library_would_open_is_a_one_line_user_error(tmp_path, capsys, missing):
    """A user's path that pandas or read_text() would open is checked first (celltron.inputs.existing): without that the
    library's own FileNotFoundError, not one of celltron's classes, would surface as a traceback."""
    (tmp_path / "ic50.csv").write_text("drug,A,B\nd1,1.0,2.0\nd2,0.5,1.5\n")
    (tmp_path / "drugs.csv").write_text("drug_id,Name,PubCHEM\n1,x,100\n")
    (tmp_path / "smiles.txt").write_text("100\tCC(=O)Oc1ccccc1C(=O)O\n")
    files = {"--drug-list": tmp_path / "drugs.csv", "--smiles": tmp_path / "smiles.txt"}
    files[missing] = tmp_path / "absent.txt"
    args = [
        "finetune",
        "drug-response",
        "--mode",
        "ic50",
        "--data",
        str(tmp_path / "ic50.csv"),
        "--out",
        str(tmp_path / "d"),
        "--baselines-only",
        "--drug-list",
        str(files["--drug-list"]),
        "--smiles",
        str(files["--smiles"]),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"celltron: error: {tmp_path / 'absent.txt'}: no such ") and f"({missing}); check the path" in err
    assert err.count("\n") == 1
