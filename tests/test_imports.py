"""Dependencies point one way: the corpus, the tokenizers and the CLI load without torch or
transformers, while `import celltron` still registers the model families with transformers' Auto
classes, whichever of the two a user imports first. Each check runs in a fresh interpreter, since
this test session has long imported torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "celltron.model_zoo")


def _run(code: str) -> str:
    # -W error::UserWarning: a registration that failed and only warned fails the test
    done = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code], check=False, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize(
    "modules",
    [
        "celltron.corpus",
        "celltron.corpus.build, celltron.corpus.store, celltron.corpus.readers, celltron.corpus.sharded",
        "celltron.tokenizers",
        "celltron.tokenizers.dataset, celltron.tokenizers.saving",
        "celltron.cli",
        "celltron.launch, celltron.pretrain.config, celltron.finetune.config",  # launch writes commands on a login node
    ],
)
def test_corpus_tokenizers_and_cli_load_without_torch(modules):
    loaded = _run(f"import sys; import {modules}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert loaded == "[]"


def test_cli_help_loads_no_numeric_stack():
    # `celltron --help` stays well under a second: the verbs import their library code themselves
    code = (
        "import sys\nfrom celltron.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('numpy', 'pandas', 'zarr', 'h5py', 'anndata', 'torch') if m in sys.modules))"
    )
    assert _run(code).splitlines()[-1] == "[]"


def test_corpus_stream_still_importable_from_the_package():
    assert (
        _run(
            "from celltron.corpus import CorpusStream, Corpus; import torch.utils.data as d; "
            "print(issubclass(CorpusStream, d.IterableDataset), Corpus.__name__)"
        )
        == "True Corpus"
    )


REGISTERED = (
    "from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM\n"
    "from celltron.model_zoo.scgpt import ScGPTConfig, ScGPTModel\n"
    "from celltron.model_zoo.genecompass import GeneCompassConfig, GeneCompassForPretraining\n"
    "assert type(AutoConfig.for_model('celltron_scgpt')) is ScGPTConfig\n"
    "assert type(AutoConfig.for_model('celltron_genecompass')) is GeneCompassConfig\n"
    "assert type(AutoModel.from_config(ScGPTConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, "
    "num_attention_heads=2, intermediate_size=16))) is ScGPTModel\n"
    "assert AutoModelForMaskedLM._model_mapping[GeneCompassConfig] is GeneCompassForPretraining\n"
    "print('ok')\n"
)


@pytest.mark.parametrize(
    "first",
    [
        "import celltron\nimport transformers\n",
        "import transformers\nimport celltron\n",
        "import celltron\nimport transformers.models.auto\n",
        # transformers first imported from inside celltron's own model code
        "from celltron.model_zoo.scgpt import ScGPTModel\n",
        "import celltron.finetune.drug.ic50\n",
    ],
)
def test_import_celltron_registers_the_auto_classes_in_either_order(first):
    assert _run(first + REGISTERED) == "ok"


def test_registration_waits_for_transformers_and_keeps_its_loader():
    out = _run(
        "import sys, celltron\n"
        "assert 'transformers' not in sys.modules and 'celltron.model_zoo.registry' not in sys.modules\n"
        "import transformers\n"
        "assert 'celltron.model_zoo.registry' in sys.modules\n"
        "assert type(transformers.__spec__.loader).__module__ != 'celltron', transformers.__spec__.loader\n"
        "assert not any(type(f).__module__ == 'celltron' for f in sys.meta_path)\n"
        "print('ok')\n"
    )
    assert out == "ok"


def test_no_test_only_code_sits_on_a_production_import_path():
    # the stand-in Hub server, the simulators and the DeepSpeed-on-CPU shim live in tests/;
    # the package reaches the shim only through the class path its switch names
    package = Path(__file__).resolve().parents[1] / "celltron"
    offenders = [str(p) for p in package.rglob("*.py") if re.search(r"^\s*(from|import) tests\b", p.read_text(), re.M)]
    assert offenders == []


# Which of celltron's packages each package may import (docs/architecture.md draws this); the
# base modules (errors, ranges, inputs, io, config, preprocessing) may be imported by any.
BASE = ("celltron.errors", "celltron.ranges", "celltron.inputs", "celltron.io", "celltron.config", "celltron.preprocessing")
MAY_IMPORT = {
    "corpus": (),
    "tokenizers": ("corpus",),
    "model_zoo": ("tokenizers",),
    "training": ("model_zoo",),
    "pretrain": ("corpus", "tokenizers", "model_zoo", "training"),
    "lab": ("corpus", "tokenizers", "model_zoo"),
    "hub": ("tokenizers", "model_zoo", "pretrain"),
    "finetune": ("corpus", "tokenizers", "model_zoo", "training", "lab"),
    "launch": ("pretrain.config",),  # launch writes commands: it reads the run's config, nothing more
}


def _celltron_imports(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("celltron.")}


def test_dependencies_point_one_way():
    package = Path(__file__).resolve().parents[1] / "celltron"
    wrong = []
    for path in package.rglob("*.py"):
        owner = path.relative_to(package).parts[0]
        for name in _celltron_imports(path):
            target = name.removeprefix("celltron.")
            if name.startswith(BASE) or target.split(".")[0] in (owner, "_lazy", "data"):
                continue
            if name == "celltron.cli" or owner not in MAY_IMPORT:
                if owner != "cli.py":
                    wrong.append(f"{path.relative_to(package)} imports {name}")
                continue
            if not any(target == allowed or target.startswith(allowed + ".") for allowed in MAY_IMPORT[owner]):
                wrong.append(f"{path.relative_to(package)} imports {name}")
    assert wrong == []
