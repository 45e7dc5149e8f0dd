"""One tokenizer interface: the scheme registry, `encode_block(block, rng)` on every class, saving
and loading through the registry, and imports without cycles or the numeric stack."""

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from celltron.corpus import Corpus
from celltron.errors import ConfigError, InputError
from celltron.tokenizers.binned import BinnedTokenizer
from celltron.tokenizers.dataset import _corpus_input
from celltron.tokenizers.ortholog import OrthologTokenizer
from celltron.tokenizers.rank_value import RankValueTokenizer, float32_datasets
from celltron.tokenizers.schemes import (
    _REGISTRY,
    CONFIG_FILE,
    SCHEMES,
    Block,
    Tokenizer,
    load_tokenizer,
    make_tokenizer,
    register_scheme,
    scheme_class,
    scheme_names,
)

TOKENIZERS = Path(__file__).resolve().parents[2] / "celltron" / "tokenizers"


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_registry_maps_every_scheme_to_its_class():
    assert SCHEMES == scheme_names() == ("geneformer-v1", "geneformer-v2", "scgpt", "ortholog")
    assert scheme_class("geneformer-v1") is scheme_class("geneformer-v2") is RankValueTokenizer
    assert scheme_class("scgpt") is BinnedTokenizer and scheme_class("ortholog") is OrthologTokenizer
    with pytest.raises(ConfigError, match=r"unknown scheme 'nope'; use one of \('geneformer-v1'"):
        scheme_class("nope")
    with pytest.raises(ConfigError, match="a gene subset .* scheme 'ortholog' takes none"):
        make_tokenizer("ortholog", None, None, 0, genes_subset=["ENSG00000000003"])


def test_every_scheme_encodes_a_block_as_its_own_inputs_say(small_corpus):
    corpus = Corpus(small_corpus)
    shard = ad.read_zarr(small_corpus / corpus.shards("val")[0]["path"])
    x = shard.X.tocsr()
    categories = corpus.manifest["obs_categories"]
    species = [categories["species"][c] for c in shard.obs["species"].cat.codes]
    n_counts = shard.obs["n_counts"].to_numpy()
    float32 = float32_datasets(corpus.manifest)[shard.obs["dataset"].cat.codes.to_numpy()]
    block = Block(x.indptr, x.indices, x.data, n_counts, species, {}, float32)
    genes = _corpus_input(corpus, "val", (), 256)
    for scheme in SCHEMES:
        tokenizer, vocab = make_tokenizer(scheme, genes, None, seed=3)
        assert isinstance(tokenizer, Tokenizer) and tokenizer.vocab is vocab
        ours = tokenizer.encode_block(block, np.random.default_rng(0))
        if scheme == "scgpt":
            theirs = tokenizer.encode_csr(x.indptr, x.indices, x.data, np.random.default_rng(0))
        elif scheme == "ortholog":
            theirs = tokenizer.encode_csr(x.indptr, x.indices, x.data, species, n_counts)
        else:
            theirs = tokenizer.encode_csr(x.indptr, x.indices, x.data, n_counts, float32)
        assert np.array_equal(ours.input_ids, theirs.input_ids) and np.array_equal(ours.offsets, theirs.offsets)
        assert (ours.values is None) == (theirs.values is None)
        if ours.values is not None:
            assert np.array_equal(ours.values, theirs.values)


def test_geneformer_versions_come_from_the_scheme_name(small_corpus):
    genes = _corpus_input(Corpus(small_corpus), "val", (), 256)
    v1, _ = make_tokenizer("geneformer-v1", genes, None, 0)
    v2, _ = make_tokenizer("geneformer-v2", genes, 512, 0)
    assert (v1.vocab.name, v1.max_len, v1.add_specials) == ("geneformer-v1", 2048, False)
    assert (v2.vocab.name, v2.max_len, v2.add_specials) == ("geneformer-v2", 512, True)
    assert RankValueTokenizer.fixed_vocab("geneformer-v2").name == "geneformer-v2"
    assert OrthologTokenizer.fixed_vocab("ortholog") is None


def test_a_registered_scheme_saves_and_loads_through_the_registry(tmp_path):
    @register_scheme("custom-v2")
    class Custom(RankValueTokenizer):
        SCHEME = "test_rank_value"

    try:
        assert scheme_class("custom-v2") is Custom
        genes = type("Genes", (), {"gene_ids": np.array(["ENSG00000000003"]), "gene_species": ["human"], "medians": {}})
        tokenizer, _ = make_tokenizer("custom-v2", genes, None, 0)
        tokenizer.save_pretrained(tmp_path)
        again = load_tokenizer(tmp_path, ["ENSG00000000003"])
        assert type(again) is Custom and again.settings() == tokenizer.settings()
    finally:
        del _REGISTRY["custom-v2"]
    with pytest.raises(InputError, match=f"{CONFIG_FILE}: unknown tokenizer scheme 'test_rank_value'"):
        load_tokenizer(tmp_path, ["ENSG00000000003"])


@pytest.mark.parametrize("module", sorted(p.stem for p in TOKENIZERS.glob("*.py")))
def test_each_tokenizer_module_imports_first_in_a_fresh_interpreter(module):
    # an import cycle shows as an ImportError when the cycle is entered from its other end
    name = "celltron.tokenizers" + ("" if module == "__init__" else f".{module}")
    assert _run(f"import {name}; print('ok')") == "ok"


def test_the_scheme_names_load_without_the_numeric_stack():
    code = (
        "import sys\nfrom celltron.tokenizers.schemes import SCHEMES, scheme_names\n"
        "print(sorted(m for m in ('numpy', 'torch', 'transformers', 'celltron.tokenizers.rank_value') if m in sys.modules))"
    )
    assert _run(code) == "[]"


def test_no_tokenizer_module_imports_torch_or_model_code():
    code = (
        "import sys, celltron.tokenizers.dataset, celltron.tokenizers.schemes, celltron.tokenizers.saving\n"
        "from celltron.tokenizers import BinnedTokenizer, OrthologTokenizer, RankValueTokenizer, GeneVocab\n"
        "print(sorted(m for m in ('torch', 'transformers', 'celltron.model_zoo') if m in sys.modules))"
    )
    assert _run(code) == "[]"
