"""`celltron tokenize`: corpus or .h5ad in, a `datasets` dataset out, same tokens as the library."""

import anndata as ad
import datasets
import numpy as np
import scipy.sparse as sp

from celltron.cli import main
from celltron.corpus import Corpus
from celltron.corpus.genes import map_genes
from celltron.tokenizers.rank_value import RankValueTokenizer
from celltron.tokenizers.vocab import GeneVocab


def test_h5ad_to_geneformer_dataset(tmp_path, pbmc4k, capsys):
    adata = ad.read_h5ad(pbmc4k)[:200].copy()
    adata.write_h5ad(tmp_path / "lab.h5ad")
    out = tmp_path / "tokens"
    assert (
        main(
            [
                "tokenize",
                str(tmp_path / "lab.h5ad"),
                "--scheme",
                "geneformer-v2",
                "--out",
                str(out),
                "--obs-keys",
                "Annotation",
                "--gene-column",
                "gene_symbol_original",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "cells/s" in capsys.readouterr().out
    dataset = datasets.load_from_disk(str(out))
    assert dataset.num_rows == 200 and set(dataset.column_names) == {"input_ids", "length", "Annotation"}
    assert dataset["Annotation"][:5] == adata.obs["Annotation"].astype(str).tolist()[:5]
    ids = map_genes(adata.var["gene_symbol_original"], "human", "x").ensembl_ids
    unique = list(dict.fromkeys(g for g in ids if g))
    column = {g: i for i, g in enumerate(unique)}
    x = sp.csr_matrix(adata.X)
    merge = sp.csr_matrix(
        (
            np.ones(sum(g in column for g in ids)),
            ([i for i, g in enumerate(ids) if g in column], [column[g] for g in ids if g in column]),
        ),
        shape=(len(ids), len(unique)),
    )
    merged = (x @ merge).tocsr()
    merged.sort_indices()
    expected = RankValueTokenizer.geneformer("v2", unique).encode_csr(
        merged.indptr, merged.indices, merged.data, np.asarray(x.sum(axis=1)).ravel()
    )
    for i in (0, 57, 199):
        assert dataset[i]["input_ids"] == expected[i].tolist() and dataset[i]["length"] == len(expected[i])
    assert GeneVocab.from_pretrained(out).name == "geneformer-v2"


def test_corpus_to_scgpt_and_ortholog_datasets_and_coverage(tmp_path, small_corpus, capsys):
    corpus = Corpus(small_corpus)
    for scheme in ("scgpt", "ortholog"):
        out = tmp_path / scheme
        assert (
            main(
                [
                    "tokenize",
                    str(small_corpus),
                    "--scheme",
                    scheme,
                    "--out",
                    str(out),
                    "--split",
                    "val",
                    "--obs-keys",
                    "species",
                    "--no-progress",
                ]
            )
            == 0
        )
        dataset = datasets.load_from_disk(str(out))
        assert dataset.num_rows == corpus.manifest["splits"]["val"]["n_cells"]
        assert {"input_ids", "values", "length", "species"} <= set(dataset.column_names)
        row = dataset[0]
        assert len(row["input_ids"]) == len(row["values"]) == row["length"]
    assert main(["tokenize", str(small_corpus), "--scheme", "ortholog", "--coverage"]) == 0
    printed = capsys.readouterr().out
    assert "mouse:" in printed and "shared tokens" in printed
    assert main(["tokenize", str(small_corpus), "--scheme", "scgpt", "--coverage"]) == 2


def test_every_tokenizer_saves_and_loads_next_to_a_model(tmp_path, small_corpus):
    from celltron.tokenizers.dataset import _corpus_input
    from celltron.tokenizers.schemes import load_tokenizer, make_tokenizer

    corpus = Corpus(small_corpus)
    shard = ad.read_zarr(small_corpus / corpus.shards("val")[0]["path"])
    x = shard.X.tocsr()
    species = [corpus.manifest["obs_categories"]["species"][c] for c in shard.obs["species"].cat.codes]
    for scheme in ("geneformer-v1", "geneformer-v2", "scgpt", "ortholog"):
        tokenizer, _ = make_tokenizer(scheme, _corpus_input(corpus, "val", (), 256), None, seed=4)
        tokenizer.save_pretrained(tmp_path / scheme)
        again = load_tokenizer(tmp_path / scheme, corpus.gene_ids)
        assert type(again) is type(tokenizer) and again.settings() == tokenizer.settings()
        if scheme == "scgpt":
            a = tokenizer.encode_csr(x.indptr, x.indices, x.data, np.random.default_rng(0))
            b = again.encode_csr(x.indptr, x.indices, x.data, np.random.default_rng(0))
        elif scheme == "ortholog":
            a, b = (
                t.encode_csr(x.indptr, x.indices, x.data, species, shard.obs["n_counts"].to_numpy()) for t in (tokenizer, again)
            )
        else:
            a, b = (t.encode_csr(x.indptr, x.indices, x.data, shard.obs["n_counts"].to_numpy()) for t in (tokenizer, again))
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.offsets, b.offsets)


def test_labels_missing_in_early_blocks(tmp_path, pbmc4k):
    from celltron.tokenizers.dataset import tokenize_to_dataset

    adata = ad.read_h5ad(pbmc4k)[:120].copy()
    labels = adata.obs["Annotation"].astype(object)
    labels.iloc[:60] = None  # the first blocks carry no label at all
    adata.obs["Annotation"] = labels
    adata.write_h5ad(tmp_path / "lab.h5ad")
    tokenize_to_dataset(
        tmp_path / "lab.h5ad",
        "geneformer-v2",
        tmp_path / "out",
        obs_keys=("Annotation",),
        gene_column="gene_symbol_original",
        block_cells=50,
        progress=False,
    )
    column = datasets.load_from_disk(str(tmp_path / "out"))["Annotation"]
    assert column[:60] == [None] * 60 and column[60:] == adata.obs["Annotation"].iloc[60:].tolist()


def test_any_number_of_threads_writes_the_same_dataset(tmp_path, pbmc4k):
    """scGPT's binning draws random numbers (tie spreading, sampling to max_len): every block has
    its own generator, so threads finishing in any order write the same tokens."""
    from celltron.tokenizers.dataset import tokenize_to_dataset

    adata = ad.read_h5ad(pbmc4k)[:300].copy()
    adata.write_h5ad(tmp_path / "lab.h5ad")
    written = {}
    for threads in (1, 3):
        out = tmp_path / f"threads{threads}"
        summary = tokenize_to_dataset(
            tmp_path / "lab.h5ad",
            "scgpt",
            out,
            max_len=64,
            seed=7,
            gene_column="gene_symbol_original",
            block_cells=32,  # 10 blocks, several in flight at once
            progress=False,
            threads=threads,
        )
        assert summary["threads"] == threads and summary["cells"] == 300
        written[threads] = datasets.load_from_disk(str(out)).to_dict()
    assert written[1] == written[3]
    assert written[1]["length"] == [min(n, 64) for n in written[1]["length"]]
    assert len({tuple(v) for v in written[1]["values"]}) > 1  # real, differing cells


def test_a_file_past_the_in_memory_median_limit_gets_the_same_ortholog_tokens(tmp_path, pbmc4k, monkeypatch):
    """The ortholog scheme divides by the file's own gene medians: past the limit of values held
    in memory the file is read a second time, and the medians (so the tokens) stay exact."""
    import functools

    import celltron.tokenizers.dataset as dataset_module
    from celltron.corpus.stats import GeneStatistics

    adata = ad.read_h5ad(pbmc4k)[:200].copy()
    adata.write_h5ad(tmp_path / "lab.h5ad")
    written = {}
    for limit in (None, 0):
        if limit is not None:  # the sketch from the first value on
            monkeypatch.setattr(dataset_module, "GeneStatistics", functools.partial(GeneStatistics, exact_limit=limit))
        out = tmp_path / f"limit{limit}"
        dataset_module.tokenize_to_dataset(
            tmp_path / "lab.h5ad", "ortholog", out, max_len=64, gene_column="gene_symbol_original", block_cells=50, progress=False
        )
        written[limit] = datasets.load_from_disk(str(out)).to_dict()
    assert written[0] == written[None]
    assert len({tuple(v) for v in written[0]["values"]}) > 1
