"""Bad inputs, built on the fly, through the command line a user types: each is refused with exit
code 2 and one line naming the file or field, what is wrong and the fix; never a library
traceback, and nothing half-written (issue 15's general rules)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import h5py
import pytest

from celltron.cli import main

REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = REPO / "configs" / "pretrain" / "geneformer_debug.yaml"
BAD_YAML = "model:\n  family: geneformer\noptim:\n  lr: [0.001\ntrainer:\n  max_steps: 5\n"  # unclosed list at line 4


def refused(argv, capsys) -> str:
    """Run `celltron ARGV`; assert it exits 2 without a traceback, and return its error line."""
    try:
        code = main([str(word) for word in argv])
    except SystemExit as exit:  # argparse's usage errors exit 2 by themselves
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def refused_in_one_line(argv, capsys) -> str:
    """As `refused`, for errors celltron raises itself: stderr is exactly that one line."""
    line = refused(argv, capsys)
    assert line.startswith("celltron: error: ")
    return line


# ---------------------------------------------------------------- fixtures, built on the fly


@pytest.fixture(scope="module")
def lab_file(tmp_path_factory) -> Path:
    """A small simulated screen: raw counts of human genes, an obs column of perturbations."""
    from tests.simulate import simulate_screen

    path = tmp_path_factory.mktemp("lab") / "lab.h5ad"
    simulate_screen(n_genes=60, n_targets=4, n_combos=2, cells_per_perturbation=12, n_control=40, seed=0).adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, lab_file) -> Path:
    """A randomly initialised debug Geneformer with its tokenizer."""
    from celltron.lab.data import read_lab_data
    from tests.finetune.conftest import build_model_folder

    return build_model_folder("geneformer", read_lab_data(lab_file), tmp_path_factory.mktemp("model") / "geneformer")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, lab_file) -> Path:
    from celltron.corpus import BuildOptions, build_corpus

    out = tmp_path_factory.mktemp("corpus") / "corpus"
    build_corpus([lab_file], out, BuildOptions(val_fraction=0.1, progress=False))
    return out


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def damaged_h5ad(kind: str, lab_file: Path, folder: Path) -> Path:
    path = folder / f"{kind}.h5ad"
    if kind == "truncated":
        truncate(Path(shutil.copyfile(lab_file, path)))
    elif kind == "text":
        path.write_text("cell,CD3E,CD4\nAAAC-1,3,0\n")
    else:  # an HDF5 file, but no AnnData
        with h5py.File(path, "w") as handle:
            handle["counts"] = [[1, 2], [3, 4]]
    return path


# ---------------------------------------------------------------- .h5ad inputs


H5AD_PROBLEMS = {"truncated": "truncated, only", "text": "not an HDF5 file", "hdf5_not_anndata": "not an AnnData .h5ad file"}
H5AD_VERBS = {
    "corpus build": lambda data, out, model: ["corpus", "build", data, "--out", out / "corpus", "--no-progress"],
    "tokenize": lambda data, out, model: [
        "tokenize",
        data,
        "--scheme",
        "geneformer-v2",
        "--out",
        out / "tokens",
        "--no-progress",
    ],
    "evaluate-embedding": lambda data, out, model: [
        "evaluate-embedding",
        "--data",
        data,
        "--key",
        "X_pca",
        "--label-key",
        "cell_type",
        "--out",
        out / "eval",
    ],
    "embed": lambda data, out, model: [
        "embed",
        "--model",
        model,
        "--data",
        data,
        "--out",
        out / "embedded.h5ad",
        "--no-progress",
    ],
    "finetune annotate": lambda data, out, model: [
        "finetune",
        "annotate",
        "--data",
        data,
        "--label-key",
        "perturbation",
        "--baselines-only",
        "--out",
        out / "annotate",
    ],
}


@pytest.mark.parametrize("verb", list(H5AD_VERBS))
@pytest.mark.parametrize("kind", list(H5AD_PROBLEMS))
def test_a_damaged_h5ad_is_named_in_one_line(kind, verb, lab_file, model_folder, tmp_path, capsys):
    data = damaged_h5ad(kind, lab_file, tmp_path)
    out = tmp_path / "out"
    line = refused_in_one_line(H5AD_VERBS[verb](data, out, model_folder), capsys)
    assert str(data) in line and H5AD_PROBLEMS[kind] in line
    assert not out.exists() or not any(out.rglob("*")), "nothing is written for an input that cannot be read"


# ---------------------------------------------------------------- corpus manifest


@pytest.mark.parametrize(
    "damage, problem", [("truncate", "corpus manifest is truncated"), ("garble", "corpus manifest is not valid JSON (")]
)
@pytest.mark.parametrize("verb", [["corpus", "info"], ["corpus", "validate"], ["tokenize"]])
def test_a_damaged_manifest_is_named_in_one_line(verb, damage, problem, corpus, tmp_path, capsys):
    copy = Path(shutil.copytree(corpus, tmp_path / "corpus"))
    manifest = copy / "manifest.json"
    truncate(manifest) if damage == "truncate" else manifest.write_text(manifest.read_text().replace(":", ";", 3))
    extra = ["--scheme", "geneformer-v2", "--out", tmp_path / "tokens", "--no-progress"] if verb == ["tokenize"] else []
    line = refused_in_one_line([*verb, copy, *extra], capsys)
    assert str(manifest) in line and problem in line and "celltron corpus build --overwrite" in line


# ---------------------------------------------------------------- YAML files


YAML_VERBS = {
    "pretrain": lambda bad, out, lab: ["pretrain", bad, "--out", out],
    "finetune": lambda bad, out, lab: [
        "finetune",
        "annotate",
        "--config",
        bad,
        "--data",
        lab,
        "--label-key",
        "perturbation",
        "--baselines-only",
        "--out",
        out,
    ],
    "corpus build": lambda bad, out, lab: ["corpus", "build", lab, "--config", bad, "--out", out, "--no-progress"],
    "launch config": lambda bad, out, lab: ["launch", bad, "--out", out, "--dry-run"],
    "launch cluster": lambda bad, out, lab: ["launch", DEBUG_CONFIG, "--cluster", bad, "--out", out, "--dry-run"],
}


@pytest.mark.parametrize("verb", list(YAML_VERBS))
def test_a_yaml_syntax_error_names_the_file_and_line(verb, lab_file, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    out = tmp_path / "out"
    line = refused_in_one_line(YAML_VERBS[verb](bad, out, lab_file), capsys)
    assert f"{bad}: YAML syntax error at line 5" in line  # the scanner notices the unclosed list on the next key
    assert not out.exists()


# ---------------------------------------------------------------- model folders


MODEL_VERBS = {
    "embed": lambda model, lab, out: ["embed", "--model", model, "--data", lab, "--out", out / "embedded.h5ad", "--no-progress"],
    "grn": lambda model, lab, out: [
        "grn",
        "--model",
        model,
        "--data",
        lab,
        "--tfs",
        lab.with_suffix(".tfs"),
        "--out",
        out,
        "--max-cells",
        "40",
        "--top-genes",
        "20",
        "--device",
        "cpu",
    ],
    "finetune": lambda model, lab, out: [
        "finetune",
        "annotate",
        "--model",
        model,
        "--data",
        lab,
        "--label-key",
        "perturbation",
        "--max-steps",
        "1",
        "--out",
        out,
    ],
}


@pytest.fixture(scope="module")
def tfs_file(lab_file) -> Path:
    """Three of the lab's genes, as the TF list `celltron grn --tfs` reads."""
    import anndata as ad

    path = lab_file.with_suffix(".tfs")
    path.write_text("\n".join(ad.read_h5ad(lab_file, backed="r").var_names[:3]) + "\n")
    return path


@pytest.mark.parametrize("verb", list(MODEL_VERBS))
def test_truncated_model_weights_are_named_in_one_line(verb, model_folder, lab_file, tfs_file, tmp_path, capsys):
    damaged = Path(shutil.copytree(model_folder, tmp_path / "model"))
    truncate(damaged / "model.safetensors")
    line = refused_in_one_line(MODEL_VERBS[verb](damaged, lab_file, tmp_path / "out"), capsys)
    assert str(damaged / "model.safetensors") in line and "damaged or truncated safetensors weights" in line
    assert not (tmp_path / "out" / "embedded.h5ad").exists()


def swapped_tokenizer(model_folder: Path, lab_file: Path, out: Path) -> Path:
    """The Geneformer folder with scGPT's tokenizer saved over its own."""
    from celltron.lab.data import read_lab_data
    from celltron.tokenizers.schemes import MEDIANS_FILE, make_tokenizer

    folder = Path(shutil.copytree(model_folder, out))
    (folder / MEDIANS_FILE).unlink()
    genes, _ = read_lab_data(lab_file).mapped_genes()
    data = type("Genes", (), {"gene_ids": genes, "gene_species": ["human"] * len(genes), "medians": None})
    make_tokenizer("scgpt", data, 128, 0)[0].save_pretrained(folder)
    return folder


@pytest.mark.parametrize("verb", list(MODEL_VERBS))
def test_a_model_with_another_schemes_tokenizer_is_refused_before_any_work(
    verb, model_folder, lab_file, tfs_file, tmp_path, capsys
):
    folder = swapped_tokenizer(model_folder, lab_file, tmp_path / "swapped")
    model_tokens = json.loads((folder / "config.json").read_text())["vocab_size"]
    tokenizer_tokens = len(json.loads((folder / "vocab.json").read_text())["tokens"])
    scheme = json.loads((folder / "tokenizer_config.json").read_text())["scheme"]  # scGPT's binned values
    assert model_tokens != tokenizer_tokens
    line = refused_in_one_line(MODEL_VERBS[verb](folder, lab_file, tmp_path / "out"), capsys)
    assert str(folder) in line and f"{model_tokens} tokens" in line and f"the {scheme} tokenizer saved beside it" in line
    assert f"has {tokenizer_tokens}" in line and "put back the tokenizer the model was trained with" in line
    assert not (tmp_path / "out").exists()


def test_pretraining_from_a_model_of_another_vocabulary_is_refused(model_folder, corpus, tmp_path, capsys):
    # the model knows Geneformer V2's genes; the run would tokenise with V1's larger vocabulary
    line = refused_in_one_line(
        [
            "pretrain",
            DEBUG_CONFIG,
            "--corpus",
            corpus,
            "--out",
            tmp_path / "run",
            "--init-from",
            model_folder,
            "--set",
            "tokenizer.scheme=geneformer-v1",
            "--set",
            "logging.progress_bar=false",
        ],
        capsys,
    )
    assert str(model_folder) in line and "geneformer-v1 tokenizer" in line and "tokenizer.scheme" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------- numbers out of range


SET_CASES = [
    ("optim.lr=-1", "[optim] lr: -1.0 is out of range; allowed: > 0"),
    ("optim.lr=.nan", "[optim] lr: nan is not a finite number; allowed: > 0"),
    ("optim.betas=[0.9, 1.0]", "[optim] betas: 1.0 is out of range; allowed: [0, 1)"),
    ("optim.weight_decay=-0.1", "[optim] weight_decay: -0.1 is out of range; allowed: >= 0"),
    ("optim.min_lr_ratio=2", "[optim] min_lr_ratio: 2.0 is out of range; allowed: [0, 1]"),
    ("optim.accumulate=0", "[optim] accumulate: 0 is out of range; allowed: >= 1"),
    ("data.mask_probability=1.5", "[data] mask_probability: 1.5 is out of range; allowed: (0, 1)"),
    ("data.batch_size=0", "[data] batch_size: 0 is out of range; allowed: >= 1"),
    ("data.num_workers=-1", "[data] num_workers: -1 is out of range; allowed: >= 0"),
    ("tokenizer.max_len=0", "[tokenizer] max_len: 0 is out of range; allowed: >= 1"),
    ("trainer.max_steps=0", "[trainer] max_steps: 0 is out of range; allowed: >= 1"),
    ("trainer.devices=0", "[trainer] devices: 0 is out of range; allowed: >= 1"),
    ("trainer.seed=-3", "[trainer] seed: -3 is out of range; allowed: >= 0"),
]


@pytest.mark.parametrize("item, message", SET_CASES, ids=[item for item, _ in SET_CASES])
def test_out_of_range_set_is_refused_naming_field_and_range(item, message, tmp_path, capsys):
    line = refused_in_one_line(["pretrain", DEBUG_CONFIG, "--out", tmp_path / "run", "--set", item], capsys)
    assert f"{DEBUG_CONFIG} {message}" in line
    assert not (tmp_path / "run").exists()


FINETUNE_SET_CASES = [
    ("annotate.test_fraction=1", "[annotate] test_fraction: 1.0 is out of range; allowed: (0, 1)"),
    ("annotate.dropout=1", "[annotate] dropout: 1.0 is out of range; allowed: [0, 1)"),
    ("model.lora_dropout=-0.5", "[model] lora_dropout: -0.5 is out of range; allowed: [0, 1)"),
    ("data.batch_size=0", "[data] batch_size: 0 is out of range; allowed: >= 1"),
    ("annotate.seeds=[0, -1]", "[annotate] seeds: -1 is out of range; allowed: >= 0"),
]


@pytest.mark.parametrize("item, message", FINETUNE_SET_CASES, ids=[item for item, _ in FINETUNE_SET_CASES])
def test_out_of_range_finetune_set_is_refused(item, message, lab_file, tmp_path, capsys):
    config = REPO / "configs" / "finetune" / "annotate.yaml"
    line = refused_in_one_line(
        [
            "finetune",
            "annotate",
            "--config",
            config,
            "--data",
            lab_file,
            "--label-key",
            "perturbation",
            "--baselines-only",
            "--out",
            tmp_path / "out",
            "--set",
            item,
        ],
        capsys,
    )
    assert f"{config} {message}" in line


YAML_RANGE_CASES = {
    "pretrain": (
        "optim:\n  lr: -0.5\n",
        lambda bad, out, lab: ["pretrain", bad, "--out", out],
        "[optim] lr: -0.5 is out of range",
    ),
    "finetune": (
        "drug:\n  test_fraction: 0\n",
        lambda bad, out, lab: ["finetune", "drug-response", "--config", bad, "--data", lab, "--baselines-only", "--out", out],
        "[drug] test_fraction: 0.0 is out of range; allowed: (0, 1)",
    ),
    "corpus build": (
        "max_mito_fraction: 1.5\n",
        lambda bad, out, lab: ["corpus", "build", lab, "--config", bad, "--out", out, "--no-progress"],
        "max_mito_fraction: 1.5 is out of range; allowed: [0, 1]",
    ),
    "corpus weights": (
        "weights: {lab.h5ad: .inf}\n",
        lambda bad, out, lab: ["corpus", "build", lab, "--config", bad, "--out", out, "--no-progress"],
        "weights['lab.h5ad']: inf is not a finite number; allowed: > 0",
    ),
    "launch cluster": (
        "backend: slurm\nport: 70000\n",
        lambda bad, out, lab: ["launch", DEBUG_CONFIG, "--cluster", bad, "--out", out, "--dry-run"],
        "port: 70000 is out of range; allowed: [1, 65535]",
    ),
    "launch time": (
        "backend: slurm\ntime: 48:00:00\n",  # unquoted, YAML reads a number of seconds
        lambda bad, out, lab: ["launch", DEBUG_CONFIG, "--cluster", bad, "--out", out, "--dry-run"],
        "time: 172800 is not a time limit; use 'HH:MM:SS', quoted in YAML",
    ),
}


@pytest.mark.parametrize("case", list(YAML_RANGE_CASES))
def test_out_of_range_yaml_value_is_refused_naming_file_and_field(case, lab_file, tmp_path, capsys):
    text, argv, message = YAML_RANGE_CASES[case]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    line = refused_in_one_line(argv(bad, tmp_path / "out", lab_file), capsys)
    assert f"{bad} " in line and message in line
    assert not (tmp_path / "out").exists()


FLAG_CASES = [
    (
        ["corpus", "build", "{lab}", "--out", "{out}", "--val-fraction", "1"],
        "--val-fraction: 1.0 is out of range; allowed: [0, 1)",
    ),
    (["corpus", "build", "{lab}", "--out", "{out}", "--min-genes", "-1"], "--min-genes: -1 is out of range; allowed: >= 0"),
    (
        ["corpus", "build", "{lab}", "--out", "{out}", "--max-mito-fraction", "nan"],
        "--max-mito-fraction: nan is not a finite number",
    ),
    (
        ["corpus", "build", "{lab}", "--out", "{out}", "--shard-size-mb", "0"],
        "--shard-size-mb: 0.0 is out of range; allowed: > 0",
    ),
    (["corpus", "build", "{lab}", "--out", "{out}", "--chunk-nnz", "0"], "--chunk-nnz: 0 is out of range; allowed: >= 1"),
    (
        ["corpus", "build", "{lab}", "--out", "{out}", "--weight", "lab.h5ad=-2"],
        "--weight: lab.h5ad=-2: -2.0 is out of range; allowed: > 0",
    ),
    (["corpus", "build", "{lab}", "--out", "{out}", "--weight", "lab.h5ad"], "--weight: 'lab.h5ad': expected NAME=W"),
    (
        ["tokenize", "{lab}", "--scheme", "scgpt", "--out", "{out}", "--max-len", "0"],
        "--max-len: 0 is out of range; allowed: >= 1",
    ),
    (["tokenize", "{lab}", "--scheme", "scgpt", "--out", "{out}", "--hvg", "0"], "--hvg: 0 is out of range; allowed: >= 1"),
    (["tokenize", "{lab}", "--scheme", "scgpt", "--out", "{out}", "--hvg-span", "-0.3"], "--hvg-span: -0.3 is out of range"),
    (["pretrain", str(DEBUG_CONFIG), "--out", "{out}", "--max-steps", "-5"], "--max-steps: -5 is out of range; allowed: >= 1"),
    (["pretrain", str(DEBUG_CONFIG), "--out", "{out}", "--devices", "0"], "--devices: 0 is out of range; allowed: >= 1"),
    (["pretrain", str(DEBUG_CONFIG), "--out", "{out}", "--num-nodes", "two"], "--num-nodes: 'two' is not an integer"),
    (
        ["finetune", "annotate", "--data", "{lab}", "--out", "{out}", "--test-fraction", "1"],
        "--test-fraction: 1.0 is out of range",
    ),
    (
        ["finetune", "annotate", "--data", "{lab}", "--out", "{out}", "--freeze", "-1"],
        "--freeze: -1 is out of range; allowed: >= 0",
    ),
    (["grn", "--data", "{lab}", "--out", "{out}", "--max-cells", "-1"], "--max-cells: -1 is out of range; allowed: >= 0"),
    (["grn", "--data", "{lab}", "--out", "{out}", "--top-genes", "-10"], "--top-genes: -10 is out of range; allowed: >= 1"),
    (["embed", "--model", "m", "--data", "{lab}", "--out", "{out}", "--batch-size", "0"], "--batch-size: 0 is out of range"),
    (["embed", "--model", "m", "--data", "{lab}", "--out", "{out}", "--block-cells", "0"], "--block-cells: 0 is out of range"),
    (["embed", "--model", "m", "--data", "{lab}", "--out", "{out}", "--devices", "0"], "--devices: 0 is out of range"),
    (
        ["evaluate-embedding", "--data", "{lab}", "--key", "k", "--label-key", "l", "--folds", "1"],
        "--folds: 1 is out of range; allowed: >= 2",
    ),
    (
        ["evaluate-embedding", "--data", "{lab}", "--key", "k", "--label-key", "l", "--neighbors", "0"],
        "--neighbors: 0 is out of range",
    ),
    (["launch", str(DEBUG_CONFIG), "--out", "{out}", "--nodes", "0"], "--nodes: 0 is out of range; allowed: >= 1"),
    (
        ["launch", str(DEBUG_CONFIG), "--out", "{out}", "--gpus-per-node", "0"],
        "--gpus-per-node: 0 is out of range; allowed: >= 1",
    ),
    (["launch", str(DEBUG_CONFIG), "--out", "{out}", "--port", "70000"], "--port: 70000 is out of range; allowed: [1, 65535]"),
]


@pytest.mark.parametrize("argv, message", FLAG_CASES, ids=[" ".join(argv[:1] + argv[-2:]) for argv, _ in FLAG_CASES])
def test_out_of_range_flag_is_refused_naming_flag_and_range(argv, message, lab_file, tmp_path, capsys):
    out = tmp_path / "out"
    line = refused([word.format(lab=lab_file, out=out) for word in argv], capsys)
    assert line.startswith("celltron ") and f"error: argument {message}" in line
    assert not out.exists()


def test_launch_time_flag_must_be_a_time_limit(tmp_path, capsys):
    line = refused_in_one_line(
        ["launch", DEBUG_CONFIG, "--backend", "slurm", "--time", "90", "--out", tmp_path, "--dry-run"], capsys
    )
    assert "launch flags (--backend, --time) time: 90 is not a time limit" in line


# ---------------------------------------------------------------- launch checks the run's config first


LAUNCH_CONFIGS = {
    "missing": (None, "no such config file"),
    "yaml syntax": (BAD_YAML, "YAML syntax error at line 5"),
    "unknown section": ("optimiser:\n  lr: 0.1\n", "unknown section(s) ['optimiser']"),
    "not a mapping": ("- model\n- optim\n", "expected a mapping of sections, got list"),
}


@pytest.mark.parametrize("backend", ["torchrun", "slurm", "deepspeed"])
@pytest.mark.parametrize("case", list(LAUNCH_CONFIGS))
def test_launch_checks_the_config_before_writing_any_script(case, backend, tmp_path, capsys):
    text, message = LAUNCH_CONFIGS[case]
    config = tmp_path / "run.yaml"
    if text is not None:
        config.write_text(text)
    out = tmp_path / "out"
    line = refused_in_one_line(["launch", config, "--backend", backend, "--nodes", "2", "--out", out, "--dry-run"], capsys)
    assert str(config) in line and message in line
    assert not out.exists(), "no script is written for a config that cannot run"


def test_launch_checks_the_set_items_passed_on_to_pretrain(tmp_path, capsys):
    out = tmp_path / "out"
    line = refused_in_one_line(["launch", DEBUG_CONFIG, "--out", out, "--dry-run", "--", "--set", "optim.lr=0"], capsys)
    assert f"{DEBUG_CONFIG} [optim] lr: 0.0 is out of range; allowed: > 0" in line
    assert not out.exists()


def test_launch_writes_scripts_for_a_good_config(tmp_path, capsys):
    assert (
        main(
            [
                "launch",
                str(DEBUG_CONFIG),
                "--backend",
                "slurm",
                "--out",
                str(tmp_path),
                "--dry-run",
                "--",
                "--set",
                "optim.lr=0.01",
            ]
        )
        == 0
    )
    assert (tmp_path / "launch" / "job.sbatch").exists()


# ---------------------------------------------------------------- library calls check the same ranges


def test_library_calls_check_ranges_too():
    from celltron.corpus import BuildOptions
    from celltron.errors import ConfigError
    from celltron.launch import ClusterSpec
    from celltron.pretrain.config import PretrainConfig, replace

    with pytest.raises(ConfigError, match=r"build option min_counts: -1 is out of range; allowed: >= 0"):
        BuildOptions(min_counts=-1)
    with pytest.raises(ConfigError, match=r"config \[trainer\] checkpoint_every: 0 is out of range"):
        replace(PretrainConfig(), trainer={"checkpoint_every": 0})
    with pytest.raises(ConfigError, match=r"cluster spec gpus_per_node: 0 is out of range"):
        ClusterSpec(gpus_per_node=0).check()


@pytest.mark.parametrize(
    "allowed, inside, outside",
    [
        ("> 0", [1e-12, 5], [0, -1]),
        (">= 1", [1, 10**9], [0, 0.999]),
        ("[0, 1)", [0, 0.5], [1, -1e-9]),
        ("(0, 1)", [1e-9, 0.999], [0, 1]),
        ("[0, 1]", [0, 1], [1.0001, -0.1]),
        ("[1, 65535]", [1, 65535], [0, 65536]),
    ],
)
def test_a_range_allows_exactly_its_interval(allowed, inside, outside):
    from celltron.errors import ConfigError
    from celltron.ranges import Range, check_number

    bounds = Range.parse(allowed)
    for value in inside:
        assert check_number(value, bounds, "x") == value
    for value in [*outside, math.nan, math.inf, True, "1"]:
        with pytest.raises(ConfigError, match=rf"^x: .* allowed: {re.escape(allowed)}$"):
            check_number(value, bounds, "x")


# ---------------------------------------------------------------- checkpoints and JSON, directly


@pytest.mark.parametrize("damage", ["truncated", "text", "empty"])
def test_a_damaged_checkpoint_is_a_checkpoint_error_naming_it(damage, tmp_path):
    import torch

    from celltron.errors import CheckpointError
    from celltron.inputs import load_torch_checkpoint
    from celltron.training.checkpoints import model_state_from_checkpoint

    path = tmp_path / "step=10.ckpt"
    torch.save({"state_dict": {"model.weight": torch.zeros(64, 64)}}, path)
    if damage == "truncated":
        truncate(path)
    else:
        path.write_text("" if damage == "empty" else "not a checkpoint")
    with pytest.raises(
        CheckpointError, match=rf"^{re.escape(str(path))}: damaged or truncated checkpoint \(.+\); .*--resume auto"
    ):
        load_torch_checkpoint(path, weights_only=True)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):  # what export and publish read checkpoints with
        model_state_from_checkpoint(path)


def test_the_tokenizer_files_of_a_model_folder_are_checked(model_folder, tmp_path):
    from celltron.errors import InputError
    from celltron.tokenizers.schemes import load_tokenizer

    folder = Path(shutil.copytree(model_folder, tmp_path / "model"))
    truncate(folder / "tokenizer_config.json", 0.6)
    with pytest.raises(
        InputError, match=r"tokenizer_config.json: tokenizer config is truncated; copy or download the model folder"
    ):
        load_tokenizer(folder, [])
