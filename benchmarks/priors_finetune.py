"""Do knowledge priors carry into fine-tuning? GeneCompass models pretrained with no prior, the
GRN prior and the co-expression prior (the same config, corpus, steps and seeds as
benchmarks/priors.py, whose runs this reuses), each taken through four fine-tuning benchmarks,
and a GRN check on TF blocks the prior never saw:

- `perturbation`: `celltron finetune perturbation` on Papalexi 2021 (held-out split, frozen
  encoder, the split seed = the pretraining seed). Per held-out perturbation, the model's own head
  (`model_plain`) and the anchored head, with a prior − without, paired per (seed, perturbation).
- `grn`: `celltron grn --method embedding` on the PBMC 4k set against TRRUST (TF x target blocks,
  500 cells, seed = the pretraining seed). The model alone's AUPRC ratio per held-out block, with a
  prior − without, paired per (seed, block). The GRN prior is built from this same TRRUST table,
  so its row is leaky by construction: it says what a prior built from the truth gives, no more.
- `grn_heldout`: the honest GRN check. TRRUST's TFs in 5 seeded blocks
  (benchmarks/priors_grn_heldout.py); per block a GRN prior is built without the block's TFs'
  out-edges and a model pretrained with it (seed 0). The block's held-out pairs are scored by the
  cosine of two genes' fused token embeddings (`fused_gene_embeddings`: learned vector and priors
  through the fusion MLP), beside the no-prior model (seed 0) and the prior matrix itself, on one
  candidate set per block. AUPRC ratio over random, prior − none paired per block.

- `annotate`: the frozen-encoder probe of benchmarks/embedding.py on PBMC 4k (split seed = the
  pretraining seed): the model alone's and the anchored head's F1 per cell type (mean over seeds).
- `crossmodal`: TEA-seq RNA -> 46 proteins (`finetune cross-modal predict`, 20% of cells held out,
  seed = the pretraining seed; no TEA-seq cell is in the pretraining corpus): the model alone's
  (ridge on the frozen embedding) and the anchored head's Pearson per protein (mean over seeds).

    python -m benchmarks.priors_finetune [--seeds 0 1 2] [--steps 400] [--tasks perturbation grn grn_heldout annotate crossmodal]
        [--config genecompass_benchmark.yaml --steps 640 --variants none coexpression]

Runs of any config or length other than the debug default go under finetune/<tag>/ and
grn_heldout/<tag>/ (tag: config-STEPSsteps-dDIMS), beside the models.

Prints markdown tables. Intervals: 95%, over perturbations / blocks (t below 20 units).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks._data import shared_paths
from benchmarks._pretrained import benchmark_corpus
from benchmarks.perturbation import DATASETS, FROZEN_CHOICES, REFERENCE
from benchmarks.priors import TRRUST, VARIANTS, add_pretraining_options, pretrain_variant, priors_folder, run_name
from benchmarks.priors_grn_heldout import BLOCKS, cosine_scores, token_edges, truth_matrix
from celltron.cli import main as celltron
from celltron.finetune.report import mean_interval

PBMC4K = "scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad"
PERTURBATION_METRIC = "pearson_delta_de20_notarget"


def pretrained_runs(args, corpus: Path, priors: Path) -> dict:
    """{(variant, seed): pretrain_variant's record}, in benchmarks/priors.py's folders."""
    tag = model_tag(args)
    runs = {}
    for variant, names in VARIANTS.items():
        if variant not in args.variants:
            continue
        for seed in args.seeds:
            folder = args.out / tag / run_name(variant, seed)
            runs[variant, seed] = pretrain_variant(args.config, corpus, priors, names, seed, args.steps, folder)
            print(f"pretrained {variant} seed {seed}: {runs[variant, seed]['seconds']:.0f} s", flush=True)
    return runs


DEFAULT_TAG = "genecompass_debug-400steps-d32"  # its runs sit directly under finetune/ and grn_heldout/


def model_tag(args) -> str:
    """The pretrained models' folder name: config, steps and prior width."""
    return f"{Path(args.config).stem}-{args.steps}steps-d{args.dims}"


def tagged(args, name: str) -> Path:
    """Where runs of these models go: out/NAME for the default debug models, out/NAME/<tag> for
    any other config or length (so they never reuse each other's results)."""
    tag = model_tag(args)
    return args.out / name if tag == DEFAULT_TAG else args.out / name / tag


def _present(means: dict) -> list[str]:
    """The prior variants that ran (`--variants`), in VARIANTS order."""
    ran = {key[0] if isinstance(key, tuple) else key for key in means}
    return [variant for variant in VARIANTS if variant in ran]


def difference_line(name: str, mine: dict, none: dict, unit: str) -> str:
    """`name` − none over the units both have, with its interval."""
    units = sorted(set(mine) & set(none))
    d = mean_interval([mine[u] - none[u] for u in units])
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] over {len(units)} {unit}"


def perturbation_task(args, runs: dict) -> str:
    (data, reference) = shared_paths(args.shared_data, DATASETS["papalexi"], REFERENCE)
    per_unit: dict = {}
    means: dict = {}
    seconds: dict = {}
    for (variant, seed), run in runs.items():
        folder = tagged(args, "finetune") / "perturbation" / f"{variant}_s{seed}"
        if not (folder / "metrics.json").exists():
            start = time.perf_counter()
            command = ["finetune", "perturbation", "--model", str(run["export"]), "--encoder", "frozen", *FROZEN_CHOICES]
            command += [
                "--data",
                str(data),
                "--split",
                "heldout",
                "--seeds",
                str(seed),
                "--coexpression-reference",
                str(reference),
            ]
            assert celltron([*command, "--max-steps", str(args.perturbation_steps), "--out", str(folder)]) == 0
            (folder / "seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
        metrics = json.loads((folder / "metrics.json").read_text())
        seconds.setdefault(variant, []).append(float((folder / "seconds.txt").read_text()))
        for head in ("model_plain", "model", "best_baseline"):
            for p, result in metrics[head]["per_perturbation"][str(seed)].items():
                per_unit.setdefault((variant, head), {})[(seed, p)] = result[PERTURBATION_METRIC]
            means.setdefault((variant, head), []).append(metrics[head][PERTURBATION_METRIC])
    lines = [
        "| priors | model alone | anchored head | best baseline | model alone − none | anchored − none | s a run |",
        "|---" * 7 + "|",
    ]
    for variant in _present(means):
        cells = [f"{np.mean(means[variant, h]):.3f}" for h in ("model_plain", "model", "best_baseline")]
        if variant == "none":
            cells += ["", ""]
        else:
            cells += [
                difference_line(variant, per_unit[variant, h], per_unit["none", h], "(seed, perturbation)")
                for h in ("model_plain", "model")
            ]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {np.mean(seconds[variant]):.0f} |")
    return "\n".join(lines)


def grn_task(args, runs: dict) -> str:
    data, truth = shared_paths(args.shared_data, PBMC4K, TRRUST)
    per_block: dict = {}
    means: dict = {}
    for (variant, seed), run in runs.items():
        folder = tagged(args, "finetune") / "grn" / f"{variant}_s{seed}"
        if not (folder / "metrics.json").exists():
            command = ["grn", "--model", str(run["export"]), "--data", str(data), "--gene-column", "gene_symbol_original"]
            command += ["--truth", str(truth), "--method", "embedding", "--seed", str(seed), "--max-cells", "500"]
            assert celltron([*command, "--top-genes", "1000", "--out", str(folder)]) == 0
        metrics = json.loads((folder / "metrics.json").read_text())
        for i, fold in enumerate(metrics["model_plain"]["folds"]):
            per_block.setdefault(variant, {})[(seed, i)] = fold["auprc_ratio"]
        means.setdefault(variant, []).append(metrics["model_plain"]["auprc_ratio"])
        means.setdefault("degree prior", []).append(metrics["baselines"]["degree_prior"]["auprc_ratio"])
    lines = ["| priors | model alone, AUPRC ratio | − none, per (seed, block) |", "|---|---|---|"]
    for variant in _present(means):
        delta = "" if variant == "none" else difference_line(variant, per_block[variant], per_block["none"], "(seed, block)")
        lines.append(f"| {variant} | {np.mean(means[variant]):.2f} | {delta} |")
    lines.append(f"| baseline: degree prior | {np.mean(means['degree prior']):.2f} | |")
    return "\n".join(lines)


def annotation_task(args, runs: dict) -> str:
    """The frozen-encoder probe (benchmarks/embedding.py's protocol) on PBMC 4k, split seed = the
    pretraining seed: the model alone's F1 per cell type (mean over seeds), with a prior − without."""
    from benchmarks.embedding import PROBE_FLAGS, annotation, labelled_copy

    work = tagged(args, "finetune") / "annotate"
    work.mkdir(parents=True, exist_ok=True)
    data = labelled_copy(args.shared_data, work)
    per_unit: dict = {}
    means: dict = {}
    for (variant, seed), run in runs.items():
        metrics = annotation(run["export"], data, work, [seed], 1000, PROBE_FLAGS, f"{variant}_s{seed}")
        for head in ("model_plain", "model"):
            for name, report in metrics[head]["reports"][str(seed)]["per_class"].items():
                per_unit.setdefault((variant, head), {})[(seed, name)] = report["f1-score"]
            means.setdefault((variant, head), []).append(metrics[head]["macro_f1"])
        means.setdefault(("baseline", "model"), []).append(metrics["baselines"]["pca_logreg"]["macro_f1"])
    return _two_heads_table(per_unit, means, "macro-F1", "cell types (F1, mean over seeds)")


def crossmodal_task(args, runs: dict) -> str:
    """TEA-seq RNA -> 46 proteins (cells the models never saw: they were pretrained on the PBMC
    corpus), a random 20% of cells held out per seed = the pretraining seed: the model alone's
    (ridge on the frozen embedding) Pearson per protein (mean over seeds), with a prior − without."""
    from benchmarks.crossmodal import run_task, teaseq_files

    files = teaseq_files(args.shared_data)
    per_unit: dict = {}
    means: dict = {}
    for (variant, seed), run in runs.items():
        folder = tagged(args, "finetune") / "crossmodal" / f"{variant}_s{seed}"
        if (folder / "metrics.json").exists():
            metrics = json.loads((folder / "metrics.json").read_text())
        else:
            metrics = run_task("predict", files, folder, [seed], run["export"], label_key="cell_type")
        for head in ("model_plain", "model"):
            for protein, scores in metrics[head]["per_protein"][str(seed)].items():
                per_unit.setdefault((variant, head), {})[(seed, protein)] = scores["pearson"]
            means.setdefault((variant, head), []).append(metrics[head]["pearson"])
        best = metrics["best_baseline"]["per_seed"][str(seed)]["name"]
        means.setdefault(("baseline", "model"), []).append(metrics["baselines"][best]["pearson"])
    return _two_heads_table(per_unit, means, "per-protein Pearson", "proteins (mean over seeds)")


def _over_seeds(per_unit: dict) -> dict:
    """{(seed, item): value} -> {item: mean over seeds}: every seed scores the same proteins or
    cell types, so an item is one unit, not one per seed."""
    items: dict = {}
    for (_, item), value in per_unit.items():
        items.setdefault(item, []).append(value)
    return {item: float(np.mean(values)) for item, values in items.items()}


def _two_heads_table(per_unit: dict, means: dict, metric: str, unit: str) -> str:
    """The model alone and the anchored head per prior variant, each with its − none difference."""
    lines = [
        f"| priors | model alone, {metric} | anchored head | model alone − none | anchored − none |",
        "|---" * 5 + "|",
    ]
    for variant in _present(means):
        cells = [f"{np.mean(means[variant, h]):.3f}" for h in ("model_plain", "model")]
        for head in ("model_plain", "model"):
            mine, none = (_over_seeds(per_unit[v, head]) for v in (variant, "none"))
            cells.append("" if variant == "none" else difference_line(variant, mine, none, unit))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines.append(f"| baseline (best, same splits) | | {np.mean(means['baseline', 'model']):.3f} | | |")
    return "\n".join(lines)


def fused_table(export: Path) -> np.ndarray:
    from celltron.model_zoo.registry import load_pretrained

    return load_pretrained(export).fused_gene_embeddings().float().numpy()


def grn_heldout_task(args, corpus: Path, priors: Path, runs: dict) -> str:
    """Per TF block: a GRN prior without the block's out-edges, a model pretrained with it, and
    the block's held-out pairs scored by fused-embedding cosine (one candidate set per block)."""
    from sklearn.metrics import average_precision_score

    from celltron.corpus.store import Corpus
    from celltron.inputs import read_truth
    from celltron.pretrain.data import corpus_tokenizer
    from celltron.pretrain.priors import grn_prior

    vocab = corpus_tokenizer(Corpus(str(corpus)), "ortholog", None, 0).vocab
    (path,) = shared_paths(args.shared_data, TRRUST)
    table = read_truth(path)
    names = np.random.default_rng(0).permutation(sorted(set(table.tf)))
    none_table = fused_table(runs["none", args.seeds[0]]["export"])
    ratios: dict = {}
    for k, block in enumerate(np.array_split(names, BLOCKS)):
        if args.heldout_blocks is not None and k not in args.heldout_blocks:
            continue
        work = tagged(args, "grn_heldout") / f"block{k}"
        work.mkdir(parents=True, exist_ok=True)
        train = table[~table.tf.isin(set(block))]
        train.to_csv(work / "trrust_train.tsv", sep="\t", header=False, index=False)
        prior_path = work / f"prior_d{args.dims}" / "grn.npy"
        prior = grn_prior(work / "trrust_train.tsv", vocab, args.dims, "human")
        prior_path.parent.mkdir(exist_ok=True)
        np.save(prior_path, prior.matrix.astype(np.float32))
        run = pretrain_block(args, corpus, prior_path, work / f"model_s{args.seeds[0]}")
        held = token_edges(table[table.tf.isin(set(block))], vocab)
        # candidates: tokens with a row in this block's prior (so the prior itself can score them)
        tfs = np.unique(held[:, 0])
        tfs, genes = tfs[prior.has[tfs]], np.flatnonzero(prior.has)
        truth = truth_matrix(held, tfs, genes)
        not_self = genes[None, :] != tfs[:, None]
        positives = truth[not_self]
        scores = {
            "model with the block-free GRN prior": cosine_scores(fused_table(run), tfs, genes),
            "model without priors": cosine_scores(none_table, tfs, genes),
            "the block-free GRN prior itself": cosine_scores(prior.matrix, tfs, genes),
        }
        for name, score in scores.items():
            ratios.setdefault(name, []).append(average_precision_score(positives, score[not_self]) / positives.mean())
        print(
            f"block {k}: {int(positives.sum())} held-out pairs scored; "
            + ", ".join(f"{n} {r[-1]:.2f}" for n, r in ratios.items()),
            flush=True,
        )
    lines = [
        "| score of held-out TF -> target pairs | AUPRC ratio (mean over blocks) | per block | − model without priors |",
        "|---|---|---|---|",
    ]
    base = ratios["model without priors"]
    for name, values in ratios.items():
        delta = (
            ""
            if name == "model without priors"
            else difference_line(name, dict(enumerate(values)), dict(enumerate(base)), "blocks")
        )
        lines.append(f"| {name} | {np.mean(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} | {delta} |")
    return "\n".join(lines)


def pretrain_block(args, corpus: Path, prior_path: Path, folder: Path) -> Path:
    """benchmarks/priors.py's pretraining (seed: the first), with the GRN prior at `prior_path`
    (a folder's grn.npy)."""
    return pretrain_variant(args.config, corpus, prior_path.parent, ("grn",), args.seeds[0], args.steps, folder)["export"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pretraining_options(parser)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="must include none")
    parser.add_argument("--perturbation-steps", type=int, default=600)
    parser.add_argument(
        "--heldout-blocks",
        type=int,
        nargs="+",
        choices=range(BLOCKS),
        help="grn_heldout: only these TF blocks (e.g. pretrain blocks in parallel processes, then score all)",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=["perturbation", "grn", "grn_heldout", "annotate", "crossmodal"],
        default=["perturbation", "grn", "grn_heldout", "annotate", "crossmodal"],
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = benchmark_corpus(shared_data=args.shared_data) / "corpus"
    priors = priors_folder(corpus, args.shared_data, args.out, args.dims)
    runs = pretrained_runs(args, corpus, priors)
    tasks = {"perturbation": lambda: perturbation_task(args, runs), "grn": lambda: grn_task(args, runs)}
    tasks["grn_heldout"] = lambda: grn_heldout_task(args, corpus, priors, runs)
    tasks["annotate"] = lambda: annotation_task(args, runs)
    tasks["crossmodal"] = lambda: crossmodal_task(args, runs)
    for name in args.tasks:
        text = tasks[name]()
        print(
            f"\n### {name} ({args.config}, {args.steps} pretraining steps, seeds {args.seeds}, priors {args.dims} wide)\n\n{text}\n",
            flush=True,
        )


if __name__ == "__main__":
    main()
