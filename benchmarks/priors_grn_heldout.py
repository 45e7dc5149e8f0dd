"""Does the GRN prior recover regulation it was not built from? TRRUST's TFs in 5 seeded blocks;
for each block, the GRN prior is built from TRRUST without the block's TFs' out-edges (the TFs
stay in the graph only where other TFs regulate them), and the block's held-out TF -> target
pairs are scored among every (held-out TF, gene with a row) pair by:

- `grn prior`: cosine similarity of the two genes' rows in that prior;
- `coexpression prior`: cosine in the co-expression prior (built from the corpus's cells, no
  TRRUST at all);
- `degree`: how many training TFs regulate the target (no expression, no prior: the
  degree-biased rule that beats most GRN methods on TRRUST);
- random: the share of positives among the candidates (AUPRC of a random score).

Per block: AUPRC over the pooled candidate pairs of its held-out TFs that have a row (and how
many held-out edges could be scored at all). Mean over blocks, ratio over random.

    python -m benchmarks.priors_grn_heldout [--dims 32] [--out runs/bench/priors]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks._data import add_shared_data_option, shared_paths
from benchmarks._pretrained import benchmark_corpus
from benchmarks.priors import TRRUST, priors_folder
from celltron.corpus.genes import map_input_genes
from celltron.corpus.store import Corpus
from celltron.inputs import read_truth
from celltron.pretrain.data import corpus_tokenizer
from celltron.pretrain.priors import grn_prior

BLOCKS = 5


def token_edges(table, vocab) -> np.ndarray:
    """(E, 2) token pairs (tf, target) of the table's pairs whose genes both have tokens."""
    names = np.unique(np.concatenate([table.tf.to_numpy(str), table.target.to_numpy(str)]))
    ids = map_input_genes(names, "human", "TRRUST", min_fraction=0.0).ensembl_ids
    token = dict(zip(names, vocab.lookup_genes(np.where(ids == "", "-", ids))))
    pairs = np.stack([table.tf.map(token).to_numpy(np.int64), table.target.map(token).to_numpy(np.int64)], axis=1)
    keep = (pairs >= 0).all(1) & (pairs[:, 0] != pairs[:, 1])
    return np.unique(pairs[keep], axis=0)


def cosine_scores(matrix: np.ndarray, tfs: np.ndarray, genes: np.ndarray) -> np.ndarray:
    a, b = matrix[tfs], matrix[genes]
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def truth_matrix(edges: np.ndarray, tfs: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """(tfs, genes) booleans: which of the pairs are among `edges` ((E, 2) token pairs)."""
    truth = np.zeros((len(tfs), len(genes)), dtype=bool)
    row, column = {t: i for i, t in enumerate(tfs)}, {g: j for j, g in enumerate(genes)}
    for tf, target in edges:
        if tf in row and target in column:
            truth[row[tf], column[target]] = True
    return truth


def evaluate_block(table, vocab, held_names: set, coexpression: np.ndarray, dims: int, work: Path) -> dict:
    """Build the GRN prior without the held TFs' out-edges and score their held-out pairs."""
    from sklearn.metrics import average_precision_score

    train = table[~table.tf.isin(held_names)]
    work.mkdir(parents=True, exist_ok=True)
    path = work / "trrust_train.tsv"
    train.to_csv(path, sep="\t", header=False, index=False)
    prior = grn_prior(path, vocab, dims, "human")
    held_edges = token_edges(table[table.tf.isin(held_names)], vocab)
    train_edges = token_edges(train, vocab)
    covered = prior.has & np.any(coexpression != 0, axis=1)  # rows in both priors: one candidate set for both
    tfs = np.unique(held_edges[:, 0])
    tfs = tfs[covered[tfs]]
    genes = np.flatnonzero(covered)
    truth = truth_matrix(held_edges, tfs, genes)
    not_self = genes[None, :] != tfs[:, None]
    in_degree = np.bincount(train_edges[:, 1], minlength=len(vocab))[genes]
    scores = {
        "grn prior": cosine_scores(prior.matrix, tfs, genes),
        "coexpression prior": cosine_scores(coexpression, tfs, genes),
        "degree": np.broadcast_to(in_degree, truth.shape).astype(float),
    }
    positives = truth[not_self]
    out = {"held_tfs": len(held_names), "held_edges": len(held_edges), "scored_edges": int(positives.sum())}
    out["random"] = float(positives.mean())
    for name, score in scores.items():
        out[name] = float(average_precision_score(positives, score[not_self]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/priors"))
    add_shared_data_option(parser)
    args = parser.parse_args()
    corpus = benchmark_corpus(shared_data=args.shared_data) / "corpus"
    folder = priors_folder(corpus, args.shared_data, args.out, args.dims)
    coexpression = np.load(folder / "coexpression.npy")
    vocab = corpus_tokenizer(Corpus(str(corpus)), "ortholog", None, 0).vocab
    (path,) = shared_paths(args.shared_data, TRRUST)
    table = read_truth(path)
    names = np.random.default_rng(0).permutation(sorted(set(table.tf)))
    rows = []
    for k, block in enumerate(np.array_split(names, BLOCKS)):
        result = evaluate_block(table, vocab, set(block), coexpression, args.dims, args.out / "grn_heldout" / f"block{k}")
        rows.append(result)
        print(f"block {k}: {result}", flush=True)
    methods = ("grn prior", "coexpression prior", "degree")
    print("\n| score | AUPRC (mean over blocks) | ratio over random | per block |\n|---|---|---|---|")
    random = np.mean([r["random"] for r in rows])
    print(f"| random | {random:.4f} | 1.00 | |")
    for method in methods:
        values = [r[method] for r in rows]
        ratios = [r[method] / r["random"] for r in rows]
        print(f"| {method} | {np.mean(values):.4f} | {np.mean(ratios):.2f} | {', '.join(f'{x:.2f}' for x in ratios)} |")
    held = sum(r["held_edges"] for r in rows)
    scored = sum(r["scored_edges"] for r in rows)
    print(
        f"\nheld-out TRRUST pairs with tokens: {held}; scoreable (TF and target with rows in both priors): {scored} ({scored / held:.0%})"
    )


if __name__ == "__main__":
    main()
