"""The gene-graph perturbation head (GEARS-style) on Papalexi 2021 and Norman 2019, beside the
baselines of the perturbation task: which edges it is given (TRRUST, co-expression, both),
whether it beats the same graph with its gene labels shuffled, and (with --model) node
features from a pretrained model's gene tokens. Every variant runs `celltron finetune
perturbation --graph-head` with the same splits, seeds and co-expression reference, so the
baselines are identical across variants and differences are paired per held-out perturbation.

    python -m benchmarks.perturbation_graph --dataset papalexi --split heldout --out runs/bench/graph
    python -m benchmarks.perturbation_graph --dataset norman --split simulation --out runs/bench/graph

Every variant also gives 0.9 predictive intervals (a 5-member ensemble, or MC dropout in its
own variant, calibrated on inner folds over training perturbations) and an OOD score per
held-out perturbation; their coverage and whether error rises with the score are printed.

Prints, per variant, the head alone and anchored on the best baseline (weight by inner CV over
training perturbations), the baselines, per-group figures (simulation split), and the paired
differences with 95% intervals: head alone − best baseline, head − the head on the permuted
graph, anchored head − best baseline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks._data import add_shared_data_option, shared_paths
from benchmarks._tables import mean_std_table
from benchmarks.perturbation import COLUMNS, DATASETS, REFERENCE
from celltron.cli import main as celltron

GRN = "grn/trrust_rawdata.human.tsv"
# name -> (options, needs --model); every variant shares the data, split, seeds and reference
VARIANTS = {
    "GRN + co-expression": (["--graph-grn", "{grn}"], False),
    "GRN + co-expression, MC dropout": (["--graph-grn", "{grn}", "--intervals", "mc_dropout"], False),
    "GRN + co-expression, permuted": (["--graph-grn", "{grn}", "--graph-control", "permuted"], False),
    "GRN only": (["--graph-grn", "{grn}", "--set", "perturbation.graph_neighbours=0"], False),
    "co-expression only": ([], False),
    "GRN + co-expression, co-expression features": (["--graph-grn", "{grn}", "--graph-features", "coexpression"], False),
    "GRN + co-expression, model features": (["--graph-grn", "{grn}", "--graph-features", "model"], True),
}
PERMUTED_OF = {"GRN + co-expression": "GRN + co-expression, permuted"}
# a variant with other node features -> the same graph with the default ones (paired per perturbation)
FEATURES_OF = {
    "GRN + co-expression, co-expression features": "GRN + co-expression",
    "GRN + co-expression, model features": "GRN + co-expression",
}


def run(shared_data: Path, out: Path, dataset: str, split: str, seeds: list[int], model: Path | None, variants=None) -> dict:
    """One `celltron finetune perturbation --graph-head` per variant (`variants`: those names
    alone); results already in `out` are read, not recomputed. Without `model` the runs are
    --baselines-only (the graph alone); with it, the model's frozen-encoder head runs too (its
    gene tokens are the node features)."""
    data, reference, grn = shared_paths(shared_data, DATASETS[dataset], REFERENCE, GRN)
    common = ["--data", str(data), "--seeds", *map(str, seeds), "--split", split, "--coexpression-reference", str(reference)]
    results = {}
    for name, (options, needs_model) in VARIANTS.items():
        if (needs_model and model is None) or (variants and name not in variants):
            continue
        where = ["--model", str(model), "--encoder", "frozen"] if needs_model else ["--baselines-only"]
        folder = out / dataset / split / name.replace(" ", "_").replace(",", "").replace("+", "and")
        if not (folder / "metrics.json").exists():
            args = [o.format(grn=grn) for o in options]
            assert celltron(["finetune", "perturbation", *where, *common, "--graph-head", *args, "--out", str(folder)]) == 0
        results[name] = json.loads((folder / "metrics.json").read_text())
    return results


def table(results: dict[str, dict]) -> str:
    first = next(iter(results.values()))
    rows = []
    for name, metrics in results.items():
        rows += [
            (f"graph head alone: {name}", metrics["graph_head_plain"]),
            (f"graph head, anchored: {name}", metrics["graph_head"]),
        ]
    rows += [(f"baseline: {name}", metrics) for name, metrics in first["baselines"].items()]
    rows.append(("best baseline (chosen by inner CV)", first["best_baseline"]))
    return mean_std_table(rows, COLUMNS)


def comparisons(results: dict[str, dict]) -> str:
    """Paired differences per held-out perturbation (averaged over seeds), 95% intervals."""
    from celltron.finetune.perturbation.evaluate import higher_is_better
    from celltron.finetune.perturbation.run import per_unit_means
    from celltron.finetune.report import paired_difference, verdict

    metric = next(iter(results.values()))["best_baseline"]["metric"]

    def units(metrics, key):
        return per_unit_means(metrics[key]["per_perturbation"].values(), metric)

    def line(label, a, b):
        d = paired_difference(a, b, higher_is_better(metric))
        return f"- {label} on {metric}: {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] over {d['n_units']} perturbations — {verdict(d)}"

    lines = []
    for name, metrics in results.items():
        # each run's own best baseline: with --model it may choose linear_model (the model's gene tokens)
        best = per_unit_means(metrics["best_baseline"]["per_perturbation"].values(), metric)
        weights = [c["graph_weight"] for per_seed in metrics["best_baseline"]["chosen_per_seed"].values() for c in per_seed]
        lines.append(line(f"{name}: head alone − best baseline", units(metrics, "graph_head_plain"), best))
        lines.append(line(f"{name}: anchored (w per fold {weights}) − best baseline", units(metrics, "graph_head"), best))
        fell = sorted({p for per_seed in metrics["graph_head"]["fell_back_to_train_mean"].values() for p in per_seed})
        lines.append(
            f"- {name}: graph {metrics['graph']['nodes']} genes, {metrics['graph']['edges_by_source']} edges; "
            f"predicted as the training mean (out of reach): {len(fell)} {fell[:8]}"
        )
        u = metrics.get("graph_uncertainty")
        if u:
            ood = u["ood"]
            lines.append(
                f"- {name}: {u['level']:g} intervals ({u['method']}): coverage {u['coverage']:.3f} all genes, "
                f"{u['coverage_de_notarget']:.3f} DE genes, {u['coverage_gaussian']:.3f} uncalibrated (Gaussian), mean width "
                f"{u['mean_width']:.3f}, on {u['n_with_interval']} of {u['n_units']} held-out (seed, perturbation) units; "
                f"OOD ({ood['space']} space): {ood['n_flagged']} flagged (error {ood['error_flagged']:.3f} vs "
                f"{ood['error_unflagged']:.3f} unflagged), AUROC of large error {ood['auroc_large_error']:.2f}, "
                f"Spearman {ood['spearman']:.2f} over {ood['n_units']}"
            )
        for other, what in (
            (FEATURES_OF.get(name), "the same graph with its default node features"),
            (PERMUTED_OF.get(name), "the same head on the permuted graph"),
        ):
            if other in results:
                alone = units(metrics, "graph_head_plain")
                lines.append(line(f"{name}: head alone − {what}", alone, units(results[other], "graph_head_plain")))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="papalexi")
    parser.add_argument("--split", choices=["heldout", "simulation", "leave_one_out"], default="heldout")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", type=Path, help="a pretrained model folder: adds the model-feature variant (frozen encoder)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/graph"))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="these variants alone (default: all)")
    add_shared_data_option(parser)
    args = parser.parse_args()
    results = run(args.shared_data, args.out, args.dataset, args.split, args.seeds, args.model, args.variants)
    print(table(results))
    print()
    print(comparisons(results))
    for name, metrics in results.items():
        for group, by_predictor in (metrics.get("groups") or {}).items():
            shown = {
                k: v
                for k, v in by_predictor.items()
                if k in ("graph", "graph_plain", "best_baseline", "additive", "train_mean", "linear_coexpression")
            }
            print(f"\n{name}, {group}:\n" + mean_std_table(list(shown.items()), COLUMNS[:2]))


if __name__ == "__main__":
    main()
