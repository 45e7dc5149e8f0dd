"""Commands that write a folder never delete a user's files: export, publish and convert replace
only a folder celltron wrote (its marker) or one the user lets go with --overwrite, and never the
current directory, the home directory, the source or its run; runs refused for their inputs
leave no --out behind; Ctrl-C and early stops exit with codes a scheduler can tell apart."""

from __future__ import annotations

import json

import pytest

from celltron.cli import main
from celltron.errors import OutputExistsError
from celltron.io import FOLDER_MARKER, write_folder_atomically


def _user_folder(path):
    """A folder of someone's own files."""
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


def _leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("celltron: error: "), err
    return err


@pytest.fixture
def tiny_run(tmp_path):
    """A run directory as pretraining leaves it (model/config.json, checkpoints/step=1.ckpt with
    its integrity record), with a debug Geneformer: built in a second."""
    from celltron.model_zoo import build_model
    from celltron.training.checkpoints import AtomicCheckpointIO

    model = build_model("geneformer", "debug", vocab_size=64)
    run = tmp_path / "run"
    model.config.save_pretrained(run / "model")
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    AtomicCheckpointIO().save_checkpoint({"state_dict": state}, run / "checkpoints" / "step=1.ckpt")
    return run


# the folder writer


def test_a_folder_celltron_did_not_write_is_kept_unless_overwrite(tmp_path):
    out = _user_folder(tmp_path / "out")
    with pytest.raises(OutputExistsError, match=rf"--out {out}: exists and was not written by celltron.*--overwrite"):
        write_folder_atomically(out, lambda folder: (folder / "new.txt").write_text("new"))
    assert (out / "thesis.tex").read_text() == "years of work" and not (out / "new.txt").exists()
    assert _leftovers(tmp_path) == []

    write_folder_atomically(out, lambda folder: (folder / "new.txt").write_text("new"), overwrite=True, written_by="test")
    assert sorted(p.name for p in out.iterdir()) == [FOLDER_MARKER, "new.txt"]
    assert json.loads((out / FOLDER_MARKER).read_text())["written_by"] == "test"
    # now celltron's own (the marker): replaced without the flag
    write_folder_atomically(out, lambda folder: (folder / "newer.txt").write_text("newer"))
    assert (out / "newer.txt").exists() and not (out / "new.txt").exists()
    assert _leftovers(tmp_path) == []


def test_a_failed_fill_keeps_the_previous_folder_and_leaves_no_temporary_one(tmp_path):
    out = tmp_path / "out"
    write_folder_atomically(out, lambda folder: (folder / "v1.txt").write_text("1"))

    def fail(folder):
        (folder / "half.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_folder_atomically(out, fail)
    assert sorted(p.name for p in out.iterdir()) == [FOLDER_MARKER, "v1.txt"]
    assert _leftovers(tmp_path) == []


def test_the_current_home_and_source_folders_are_never_replaced_even_with_overwrite(tmp_path, monkeypatch):
    source = _user_folder(tmp_path / "project" / "model")
    fill = lambda folder: (folder / "x").write_text("x")  # noqa: E731
    with pytest.raises(OutputExistsError, match="holds the model .* which this command reads; celltron never replaces it"):
        write_folder_atomically(tmp_path / "project", fill, overwrite=True, protected=[("the model", source)])
    with pytest.raises(OutputExistsError, match="is the model"):
        write_folder_atomically(source, fill, overwrite=True, protected=[("the model", source)])
    monkeypatch.chdir(source)
    with pytest.raises(OutputExistsError, match="--out .: is the current directory; celltron never replaces it, even with"):
        write_folder_atomically(".", fill, overwrite=True)
    with pytest.raises(OutputExistsError, match="holds the current directory"):
        write_folder_atomically("..", fill, overwrite=True)
    home = _user_folder(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputExistsError, match="is your home directory"):
        write_folder_atomically(home, fill, overwrite=True)
    assert (source / "thesis.tex").exists() and (home / "thesis.tex").exists()


# export, publish, convert on the command line


def test_export_refuses_a_users_folder_and_replaces_it_with_overwrite(tiny_run, tmp_path, capsys):
    checkpoint = tiny_run / "checkpoints" / "step=1.ckpt"
    out = _user_folder(tmp_path / "papers")
    assert main(["export", str(checkpoint), "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert str(out) in err and "--overwrite" in err
    assert (out / "thesis.tex").exists()

    assert main(["export", str(checkpoint), "--out", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").exists() and (out / FOLDER_MARKER).exists() and not (out / "thesis.tex").exists()
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0  # celltron's own export now: no flag needed


def test_export_never_replaces_the_run_the_checkpoint_or_the_current_directory(tiny_run, tmp_path, monkeypatch, capsys):
    checkpoint = tiny_run / "checkpoints" / "step=1.ckpt"
    for out in (tiny_run, tiny_run / "checkpoints", tiny_run / "model"):
        assert main(["export", str(checkpoint), "--out", str(out), "--overwrite"]) == 2
        assert "never replaces it, even with --overwrite" in _one_line_error(capsys)
    here = _user_folder(tmp_path / "here")
    monkeypatch.chdir(here)
    assert main(["export", str(checkpoint), "--out", ".", "--overwrite"]) == 2
    assert "--out .: is the current directory" in _one_line_error(capsys)
    assert checkpoint.exists() and (tiny_run / "model" / "config.json").exists() and (here / "thesis.tex").exists()


def test_publish_dry_run_obeys_the_same_rule(tiny_run, tmp_path, capsys):
    checkpoint = tiny_run / "checkpoints" / "step=1.ckpt"
    out = _user_folder(tmp_path / "papers")
    args = ["publish", str(checkpoint), "--repo-id", "lab/x", "--dry-run"]
    assert main([*args, "--out", str(out)]) == 2
    assert "--overwrite" in _one_line_error(capsys) and (out / "thesis.tex").exists()
    assert main([*args, "--out", str(tiny_run), "--overwrite"]) == 2
    assert "holds the model being published" in _one_line_error(capsys)
    # the default folder, RUN/hub, is refused as well when celltron did not write it
    _user_folder(tiny_run / "hub")
    assert main(args) == 2
    assert "choose a folder with --out" in _one_line_error(capsys)
    assert (tiny_run / "hub" / "thesis.tex").exists()

    assert main([*args, "--out", str(out), "--overwrite"]) == 0
    assert (out / "README.md").exists() and (out / "model.safetensors").exists() and not (out / "thesis.tex").exists()
    model = out  # a model folder published into a copy: the same rule for the copy
    other = _user_folder(tmp_path / "other")
    assert main(["publish", str(model), "--repo-id", "lab/x", "--dry-run", "--out", str(other)]) == 2
    assert (other / "thesis.tex").exists()


def test_convert_refuses_before_loading_anything(tmp_path, capsys):
    source = tmp_path / "geneformer"
    source.mkdir()
    (source / "config.json").write_text("{}")  # never read: the refusal comes first
    out = _user_folder(tmp_path / "papers")
    assert main(["convert", "geneformer", str(source), "--out", str(out)]) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert main(["convert", "geneformer", str(source), "--out", str(tmp_path), "--overwrite"]) == 2
    assert "holds the checkpoint being converted" in _one_line_error(capsys)
    assert (out / "thesis.tex").exists() and (source / "config.json").exists()


# runs refused for their inputs leave nothing behind


def test_corpus_build_never_replaces_the_current_directory_even_with_overwrite(small_corpus, tmp_path, monkeypatch, capsys):
    """From inside a corpus, `--out . --overwrite` used to build everything, then fail to rename
    `.`; now it is refused before any work, and the corpus is untouched."""
    before = sorted(p.name for p in small_corpus.iterdir())
    monkeypatch.chdir(small_corpus)
    assert main(["corpus", "build", str(tmp_path / "any.h5ad"), "--out", ".", "--overwrite", "--no-progress"]) == 2
    assert "--out .: is the current directory; celltron never replaces it" in capsys.readouterr().err
    assert sorted(p.name for p in small_corpus.iterdir()) == before


@pytest.fixture
def lab_file(tmp_path):
    """A small simulated screen of raw counts (human symbols), obs 'perturbation'."""
    from tests.simulate import simulate_screen

    path = tmp_path / "lab.h5ad"
    simulate_screen(n_genes=40, n_targets=4, n_combos=2, cells_per_perturbation=10, n_control=30, seed=0).adata.write_h5ad(path)
    return path


def _gene_names(path) -> list[str]:
    import anndata

    return [str(g) for g in anndata.read_h5ad(path, backed="r").var_names]


@pytest.mark.parametrize(
    "truth_text, message",
    [
        ("", "cannot be read as a tab-separated table"),
        ("TF\tTarget\n", "holds no TF-target pairs"),
        ("just-one-column\n", "expected tab-separated columns"),
        ("Stat1\tIrf1\n", "none of its 1 edges links a TF"),
    ],
)
def test_grn_checks_the_truth_before_any_work_and_writes_nothing(lab_file, tmp_path, truth_text, message, capsys):
    genes = _gene_names(lab_file)
    (tmp_path / "tfs.txt").write_text("\n".join(genes[:3]) + "\n")
    (tmp_path / "truth.tsv").write_text(truth_text)
    out = tmp_path / "grn"
    code = main(
        [
            "grn",
            "--data",
            str(lab_file),
            "--tfs",
            str(tmp_path / "tfs.txt"),
            "--truth",
            str(tmp_path / "truth.tsv"),
            "--out",
            str(out),
            "--top-genes",
            "30",
            "--max-cells",
            "50",
        ]
    )
    assert code == 2
    err = _one_line_error(capsys)
    assert message in err and "--truth" in err
    assert not out.exists()


def test_grn_refuses_an_empty_tf_list_and_writes_nothing(lab_file, tmp_path, capsys):
    (tmp_path / "tfs.txt").write_text("# no TFs yet\n")
    (tmp_path / "truth.tsv").write_text("TF1\tGENE1\n")
    out = tmp_path / "grn"
    assert (
        main(
            [
                "grn",
                "--data",
                str(lab_file),
                "--tfs",
                str(tmp_path / "tfs.txt"),
                "--truth",
                str(tmp_path / "truth.tsv"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "holds no TF symbols" in _one_line_error(capsys) and not out.exists()


def test_finetune_refused_for_its_inputs_leaves_no_out(lab_file, tmp_path, capsys):
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(b"not an h5ad")
    out = tmp_path / "perturbation"
    assert main(["finetune", "perturbation", "--data", str(bad), "--baselines-only", "--out", str(out)]) == 2
    assert not out.exists()
    out = tmp_path / "annotate"
    assert (
        main(
            [
                "finetune",
                "annotate",
                "--data",
                str(lab_file),
                "--label-key",
                "perturbation",
                "--model",
                str(tmp_path / "no-model"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert not out.exists()


def test_pretrain_with_a_bad_corpus_leaves_no_run_directory(tmp_path, capsys):
    from tests.pretrain.conftest import CONFIGS

    out = tmp_path / "run"
    config = str(CONFIGS / "pretrain" / "geneformer_debug.yaml")
    assert main(["pretrain", config, "--corpus", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "no manifest.json" in _one_line_error(capsys)
    assert not out.exists()


# Ctrl-C and early stops


def test_ctrl_c_prints_one_line_and_exits_130(monkeypatch, capsys):
    import celltron.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(celltron.cli, "_models", interrupted)
    assert main(["models"]) == 130
    printed = capsys.readouterr()
    assert printed.err == "celltron: interrupted; nothing half-written was left\n" and printed.out == ""


def test_ctrl_c_during_training_reaches_the_cli_as_an_interrupt(demo_corpus, tmp_path):
    """Lightning turns Ctrl-C in fit into its own shutdown and sys.exit(1); the run hands the
    KeyboardInterrupt back (the CLI's one line, exit 130) with Ctrl-C working again."""
    import signal

    import lightning.pytorch as pl

    from celltron.pretrain.config import load_config, replace
    from celltron.pretrain.run import pretrain
    from tests.pretrain.conftest import CONFIGS

    class CtrlC(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            raise KeyboardInterrupt

    config = replace(
        load_config(CONFIGS / "pretrain" / "geneformer_debug.yaml"),
        data={"corpus": str(demo_corpus.location)},
        logging={"progress_bar": False, "wandb": False},
        trainer={"max_steps": 3, "val_every": 100, "checkpoint_every": 100},
    )
    with pytest.raises(KeyboardInterrupt):
        pretrain(config, tmp_path / "run", callbacks=[CtrlC()])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not (tmp_path / "run" / "export").exists() and not list((tmp_path / "run").rglob("*.partial"))


@pytest.mark.parametrize(
    "stopped_by, code, said",
    [("signal", 75, "by a signal"), ("stop_at_step", 0, "(trainer.stop_at_step)"), (None, 0, "pretrained 8 steps")],
)
def test_pretrain_exit_code_tells_a_signal_stop_from_a_finished_or_planned_one(
    monkeypatch, tmp_path, capsys, stopped_by, code, said
):
    import celltron.pretrain.run
    from tests.pretrain.conftest import CONFIGS

    def fake_pretrain(config, out, resume=None, init_from=None):
        return celltron.pretrain.run.RunResult(
            tmp_path, 8, stopped_by is not None, tmp_path / "step=8.ckpt", None, None, True, stopped_by
        )

    monkeypatch.setattr(celltron.pretrain.run, "pretrain", fake_pretrain)
    assert (
        main(["pretrain", str(CONFIGS / "pretrain" / "geneformer_debug.yaml"), "--corpus", "x", "--out", str(tmp_path)]) == code
    )
    assert said in capsys.readouterr().out


@pytest.mark.parametrize("stopped_by, code", [("signal", 75), ("stop_at_step", 0)])
def test_finetune_exit_code_tells_a_signal_stop_from_a_planned_one(monkeypatch, tmp_path, capsys, stopped_by, code):
    import celltron.finetune.perturbation.run
    from celltron.training.examples import RunStopped

    def stopped(*args, **kwargs):
        raise RunStopped(f"{tmp_path}: stopped at step 3; continue with --resume auto", stopped_by)

    monkeypatch.setattr(celltron.finetune.perturbation.run, "run_perturbation", stopped)
    assert main(["finetune", "perturbation", "--data", "lab.h5ad", "--baselines-only", "--out", str(tmp_path)]) == code
    assert "continue with --resume auto" in capsys.readouterr().out
