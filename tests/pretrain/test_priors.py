"""Prior-knowledge matrices (celltron.pretrain.priors, `celltron priors build`, model.priors): a GRN's
spectral embedding on a graph with a known answer, co-expression on planted gene modules, a
lab's table aligned to the tokens, the build's folder and manifest, refusals of misaligned
priors, and a GeneCompass run whose priors come back with the exported model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from celltron.cli import main
from celltron.errors import ConfigError, InputError
from celltron.model_zoo.registry import load_pretrained
from celltron.pretrain.data import corpus_tokenizer
from celltron.pretrain.priors import build_priors, coexpression_prior, grn_prior, load_priors, table_prior
from celltron.pretrain.run import pretrain
from tests.pretrain.conftest import config_for, gene_symbols_of


def _vocab(corpus):
    return corpus_tokenizer(corpus, "ortholog", None, 0).vocab


def _tokens(vocab, corpus, symbols):
    ids = dict(zip(gene_symbols_of(corpus), corpus.gene_ids))
    return vocab.lookup_genes([ids[s] for s in symbols])


def test_grn_embedding_splits_two_communities_and_leaves_out_a_detached_pair(module_corpus, tmp_path):
    corpus, genes, _ = module_corpus
    vocab = _vocab(corpus)
    left, right, detached = genes[:8], genes[8:16], genes[20:22]
    pairs = [(a, b) for group in (left, right) for a in group for b in group if a < b]
    pairs += [(left[0], right[0]), (detached[0], detached[1]), ("NOTAGENE1", left[1])]
    table = tmp_path / "grn.tsv"
    table.write_text("".join(f"{a}\t{b}\tActivation\t1\n" for a, b in pairs))
    prior = grn_prior(table, vocab, dims=2, species="human")
    assert prior.matrix.shape == (len(vocab), 2) and prior.matrix.dtype == np.float32
    left_rows, right_rows = (prior.matrix[_tokens(vocab, corpus, group)] for group in (left, right))
    # the Fiedler vector: one community on each side of zero
    first = np.sign(left_rows[:, 0])
    assert abs(first.sum()) == len(left) and (np.sign(right_rows[:, 0]) == -first[0]).all()
    assert not prior.has[_tokens(vocab, corpus, detached)].any()  # not in the largest component
    assert prior.has.sum() == 16 and not prior.matrix[~prior.has].any()
    assert prior.method["nodes_embedded"] == 16 and prior.method["species"] == "human"


def test_a_grn_table_with_no_usable_pair_is_refused_naming_it(module_corpus, tmp_path):
    corpus, _, _ = module_corpus
    vocab = _vocab(corpus)
    (tmp_path / "none.tsv").write_text("TP53\tMDM2\nGATA1\tKLF1\n")  # human genes, none in this corpus
    with pytest.raises(InputError, match=r"--grn .*none\.tsv: none of its 2 pairs joins two genes with a token"):
        grn_prior(tmp_path / "none.tsv", vocab, dims=2)
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(InputError, match=r"--grn .*empty\.tsv: cannot be read"):
        grn_prior(tmp_path / "empty.tsv", vocab, dims=2)


def test_coexpression_puts_a_planted_module_together(module_corpus):
    corpus, genes, module_of = module_corpus
    vocab = _vocab(corpus)
    prior = coexpression_prior(corpus, vocab, dims=8, max_cells=10_000)
    tokens = _tokens(vocab, corpus, genes)
    assert prior.has[tokens].all() and prior.has.sum() == len(genes)
    unit = prior.matrix[tokens] / np.linalg.norm(prior.matrix[tokens], axis=1, keepdims=True)
    cosine = unit @ unit.T
    same = (module_of[:, None] == module_of[None, :]) & (module_of[:, None] >= 0) & ~np.eye(len(genes), dtype=bool)
    other = (module_of[:, None] != module_of[None, :]) & (module_of[:, None] >= 0) & (module_of[None, :] >= 0)
    assert cosine[same].mean() > 0.5 > cosine[other].mean() + 0.3
    assert prior.method["cells"] == corpus.manifest["splits"]["train"]["n_cells"]


def test_a_labs_table_is_aligned_to_the_tokens(module_corpus, tmp_path):
    corpus, genes, _ = module_corpus
    vocab = _vocab(corpus)
    table = tmp_path / "embeddings.csv"
    table.write_text("gene,a,b\n" + f"{genes[0]},1,2\n{genes[1]},3,4\nNOTAGENE,5,6\n")
    prior = table_prior(table, vocab, "plm")
    tokens = _tokens(vocab, corpus, genes[:2])
    assert prior.has.sum() == 2 and prior.has[tokens].all()
    values = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(prior.matrix[tokens], values / values.std(), rtol=1e-6)
    assert prior.method["rows_mapped"] == 2
    (tmp_path / "bad.csv").write_text("gene,a,b\n" + f"{genes[0]},1,x\n")
    with pytest.raises(InputError, match=r"bad\.csv.*column\(s\) b"):
        table_prior(tmp_path / "bad.csv", vocab, "plm")
    (tmp_path / "infinite.csv").write_text("gene,a,b\n" + f"{genes[0]},inf,1\n")
    with pytest.raises(InputError, match=r"infinite\.csv.*column\(s\) a hold non-numbers, blanks or infinities"):
        table_prior(tmp_path / "infinite.csv", vocab, "plm")


def test_build_writes_the_matrices_and_a_manifest_and_refuses_nothing_to_build(module_corpus, tmp_path, capsys):
    corpus, genes, _ = module_corpus
    table = tmp_path / "t.tsv"
    table.write_text("gene\tx\n" + "".join(f"{g}\t{i}\n" for i, g in enumerate(genes[:10])))
    out = tmp_path / "priors"
    assert (
        main(
            ["priors", "build", str(corpus.location), "--out", str(out), "--coexpression", "--dims", "4"]
            + ["--table", f"family={table}"]
        )
        == 0
    )
    assert "model.priors: {coexpression:" in capsys.readouterr().out
    manifest = json.loads((out / "priors.json").read_text())
    assert set(manifest["priors"]) == {"coexpression", "family"} and manifest["scheme"] == "ortholog"
    vocab = _vocab(corpus)
    assert manifest["vocab"]["size"] == len(vocab)
    loaded = load_priors({name: out / record["file"] for name, record in manifest["priors"].items()}, vocab)
    assert loaded["coexpression"].shape == (len(vocab), 4) and loaded["family"].shape == (len(vocab), 1)
    with pytest.raises(ConfigError, match="at least one of --grn"):
        build_priors(tmp_path / "none", corpus.location, "ortholog")


def test_misaligned_priors_are_refused_naming_the_file(module_corpus, tmp_path):
    corpus, _, _ = module_corpus
    vocab = _vocab(corpus)
    short = tmp_path / "short.npy"
    np.save(short, np.zeros((len(vocab) - 1, 3), np.float32))
    with pytest.raises(
        ConfigError, match=rf"model\.priors\.grn: .*short\.npy: has {len(vocab) - 1} rows.*expected \({len(vocab)}, d\)"
    ):
        load_priors({"grn": short}, vocab)
    with pytest.raises(ConfigError, match="no such file"):
        load_priors({"grn": tmp_path / "missing.npy"}, vocab)
    with pytest.raises(ConfigError, match=r"model\.priors\.grn: None: give the path of a \.npy matrix"):
        load_priors({"grn": None}, vocab)
    # the right size, but built for another vocabulary (priors.json beside it says which)
    other = tmp_path / "other"
    other.mkdir()
    np.save(other / "grn.npy", np.zeros((len(vocab), 3), np.float32))
    (other / "priors.json").write_text(
        json.dumps(
            {
                "format": "celltron-priors",
                "scheme": "ortholog",
                "corpus": "elsewhere",
                "vocab": {"name": "x", "size": len(vocab), "sha256": "0" * 64},
            }
        )
    )
    with pytest.raises(ConfigError, match="built for another vocabulary"):
        load_priors({"grn": other / "grn.npy"}, vocab)


def test_a_genecompass_run_with_priors_exports_them_and_other_families_refuse(module_corpus, tmp_path):
    corpus, _, _ = module_corpus
    out = tmp_path / "priors"
    build_priors(out, corpus.location, "ortholog", coexpression=True, dims=4)
    priors = {"coexpression": str(out / "coexpression.npy")}
    trainer = {"max_steps": 2, "val_every": 1000, "checkpoint_every": 1}
    config = config_for("genecompass_priors_debug.yaml", corpus.location, model={"priors": priors}, trainer=trainer)
    result = pretrain(config, tmp_path / "run")
    model = load_pretrained(result.export)
    np.testing.assert_array_equal(model.embeddings.prior_coexpression.numpy(), np.load(out / "coexpression.npy"))
    assert model.config.prior_dims == {"coexpression": 4}
    used = json.loads((result.export / "model_priors.json").read_text())["priors"]["coexpression"]
    assert used["built"]["method"]["kind"] == "coexpression" and used["built"]["vocab"]["size"] == len(_vocab(corpus))
    # resuming with a prior file that changed since the run started is refused
    np.save(out / "coexpression.npy", np.load(out / "coexpression.npy") * 2)
    with pytest.raises(ConfigError, match=r"model\.priors\.coexpression: .* differs from the file the run started with"):
        pretrain(config, tmp_path / "run", resume="auto")
    with pytest.raises(ConfigError, match="continues with the priors it was saved with"):
        pretrain(config, tmp_path / "continued", init_from=str(result.export))
    geneformer = config_for("geneformer_debug.yaml", corpus.location, model={"priors": priors}, trainer=trainer)
    with pytest.raises(ConfigError, match="geneformer family takes no prior knowledge"):
        pretrain(geneformer, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
