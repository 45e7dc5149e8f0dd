"""Predictive intervals and OOD flags, measured on held-out units: the gene-graph perturbation
head (Papalexi 2021 held-out perturbations, Norman 2019 GEARS simulation split; 5-member
ensemble and MC dropout) and the drug-response best baseline (GDSC, unseen compounds and
random pairs). For each: the interval level, coverage on held-out outputs (calibrated on
training units by split conformal, and the uncalibrated Gaussian interval where there is a
spread), the mean width, how many units are flagged OOD, and whether error rises with the OOD
distance (AUROC of "large error", above the median, and Spearman).

    python -m benchmarks.uncertainty --out runs/bench/uncertainty

Runs what is missing under `--out` (the perturbation runs are those of
benchmarks/perturbation_graph.py, read from `--graph-out` when already there).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import drug_response, perturbation_graph
from benchmarks._data import add_shared_data_option

GRAPH_VARIANTS = ("GRN + co-expression", "GRN + co-expression, MC dropout")
PERTURBATION_RUNS = (("papalexi", "heldout"), ("norman", "simulation"))
DRUG_SPLITS = ("drug", "random")


def _cell(value, digits=3) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def perturbation_rows(shared_data: Path, graph_out: Path, seeds: list[int]) -> list[str]:
    rows = []
    for dataset, split in PERTURBATION_RUNS:
        results = perturbation_graph.run(shared_data, graph_out, dataset, split, seeds, None)
        for variant in GRAPH_VARIANTS:
            u = results[variant]["graph_uncertainty"]
            ood = u["ood"]
            rows.append(
                f"| perturbation: {dataset} {split}, gene-graph head | {u['method']} | {u['level']:g} | "
                f"{_cell(u['coverage'])} (DE genes {_cell(u['coverage_de_notarget'])}) | {_cell(u['coverage_gaussian'])} | "
                f"{_cell(u['mean_width'])} | {ood['n_flagged']} of {ood['n_units']} ({ood['space']} space) | "
                f"{_cell(ood['error_flagged'])} vs {_cell(ood['error_unflagged'])} | {_cell(ood['auroc_large_error'], 2)} | "
                f"{_cell(ood['spearman'], 2)} |"
            )
    return rows


def drug_rows(shared_data: Path, out: Path, seeds: list[int]) -> list[str]:
    results = drug_response.run(shared_data, out / "drug", seeds, 1, ("--baselines-only",), DRUG_SPLITS)
    rows = []
    for split, metrics in results.items():
        u = metrics["uncertainty"]
        ood, covered = u["ood"], u["coverage"]
        flagged = covered.get("flagged", {}).get("coverage")
        rows.append(
            f"| drug response: GDSC {split} split, best baseline | split conformal | {u['level']:g} | "
            f"{_cell(covered['all']['coverage'])} (flagged pairs {_cell(flagged)}, unflagged "
            f"{_cell(covered.get('unflagged', {}).get('coverage'))}) | n/a | {_cell(covered['all']['mean_width'])} | "
            f"{ood['n_flagged_pairs']} of {ood['n_pairs']} pairs | {_cell(ood['error_flagged'])} vs {_cell(ood['error_unflagged'])} "
            f"(per {ood['unit']}) | {_cell(ood['auroc_large_error'], 2)} | {_cell(ood['spearman'], 2)} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/uncertainty"))
    parser.add_argument("--graph-out", type=Path, default=Path("runs/bench/graph"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", choices=["perturbation", "drug"], help="one task's rows alone")
    add_shared_data_option(parser)
    args = parser.parse_args()
    header = (
        "| task | intervals | level | coverage (calibrated) | coverage (Gaussian) | mean width | flagged OOD | "
        "error flagged vs not | AUROC large error | Spearman |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    if args.only in (None, "perturbation"):
        rows += perturbation_rows(args.shared_data, args.graph_out, args.seeds)
    if args.only in (None, "drug"):
        rows += drug_rows(args.shared_data, args.out, args.seeds)
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
