"""Do knowledge priors over drug targets help predict unseen compounds? GDSC ln(IC50), whole
compounds held out (`--split drug`), the similar_drugs baseline (the strongest for unseen drugs,
benchmarks/drug_response.md) with and without the kernel's target-prior part.

    python -m benchmarks.drug_priors [--seeds 0 1 2] [--dims 32] [--out runs/bench/drug_priors]

Variants, each chosen per seed by similar_drugs' inner cross-validation over training compounds
(the outer split's held-out compounds never enter a choice):
- `none`: the kernel grid without priors (what `celltron finetune drug-response` runs by default);
- `grn`: with `drug.target_grn` = TRRUST human (the GRN prior's table; spectral embedding);
- `coexpression`: with `drug.target_table` = the gene-gene correlation loadings of the
  benchmarks' PBMC corpus (the co-expression prior of benchmarks/priors.py, built here over every
  human gene instead of a model's vocabulary, written as a gene table);
- `grn+coexpression`: both (the kernel's prior part: the mean of the two cosines);
- `grn, prior required` and `coexpression, prior required`: the grid restricted to kernels with
  the prior part, so that its own signal is measured even where the full grid would not pick it;
- `targets alone`, `grn alone`, `coexpression alone`: one part of the kernel by itself (its
  sharpness still chosen), beside the cell-line mean a drug with no similar drug gets.

Per held-out drug: Pearson over its cell lines; each variant − none, paired per drug (its mean
over the seeds that held it out), with a 95% interval over drugs. The "alone" rows are also
scored over the held-out drugs with a target vector alone (the others get the cell-line mean).
The co-expression table is cached under --out by the corpus's key and the width. Prints markdown tables; writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._data import add_shared_data_option, shared_paths
from benchmarks._pretrained import benchmark_corpus
from benchmarks.drug_response import FILES
from celltron.finetune.config import DrugSection
from celltron.finetune.drug.features import compounds, fingerprints, target_vectors
from celltron.finetune.drug.ic50 import (
    KERNEL_GRID,
    PRIOR_GRID,
    Borrowing,
    _cell_line_mean,
    choose_kernel,
    pearson_of_each_drug,
    read_drug_names,
    read_ic50,
    read_similar_drugs,
    read_smiles,
    scored_drugs,
    split_pairs,
)
from celltron.finetune.drug.target_priors import coverage, read_target_priors
from celltron.finetune.report import finite_mean, mean_interval

TRRUST = "grn/trrust_rawdata.human.tsv"
VARIANTS = {
    "none": ((), KERNEL_GRID),
    "grn": (("grn",), KERNEL_GRID + PRIOR_GRID),
    "coexpression": (("coexpression",), KERNEL_GRID + PRIOR_GRID),
    "grn+coexpression": (("grn", "coexpression"), KERNEL_GRID + PRIOR_GRID),
    "grn, prior required": (("grn",), PRIOR_GRID),
    "coexpression, prior required": (("coexpression",), PRIOR_GRID),
    # each part alone, against the cell-line mean: does it carry any signal by itself?
    "targets alone (Jaccard; no prior)": ((), tuple(k for k in KERNEL_GRID if (k.target, k.pathway, k.structure) == (1, 0, 0))),
    "grn alone": (("grn",), tuple(k for k in PRIOR_GRID if (k.target, k.pathway, k.structure) == (0, 0, 0))),
    "coexpression alone": (("coexpression",), tuple(k for k in PRIOR_GRID if (k.target, k.pathway, k.structure) == (0, 0, 0))),
}


def coexpression_table(shared_data: Path, out: Path, dims: int) -> Path:
    """The PBMC corpus's co-expression prior over every human gene, as a gene x dims TSV."""
    from celltron.corpus.store import Corpus
    from celltron.finetune.drug.target_priors import _human_gene_vocab
    from celltron.pretrain.priors import coexpression_prior

    corpus = benchmark_corpus(shared_data=shared_data)  # corpus-<key>: its inputs' and options' digest
    path = out / f"coexpression_{corpus.name}_d{dims}.tsv"
    if path.exists():
        return path
    vocab = _human_gene_vocab()
    prior = coexpression_prior(Corpus(corpus / "corpus"), vocab, dims=dims)
    genes = np.array(vocab.ensembl_ids)[prior.has]
    table = pd.DataFrame(prior.matrix[prior.has], columns=[f"c{k}" for k in range(dims)])
    table.insert(0, "gene", genes)
    out.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    table.to_csv(partial, sep="\t", index=False)
    partial.rename(path)
    return path


def gene_tables(shared_data: Path, out: Path, dims: int) -> tuple[dict, dict]:
    """name -> (symbol -> row) for the GRN and co-expression priors, and what each reaches."""
    (trrust,) = shared_paths(shared_data, TRRUST)
    tables, records = {}, {}
    for name, section in (
        ("grn", DrugSection(target_grn=str(trrust), target_prior_dims=dims)),
        ("coexpression", DrugSection(target_table=str(coexpression_table(shared_data, out, dims)))),
    ):
        (table,), (record,) = read_target_priors(section)
        tables[name], records[name] = table, record
    return tables, records


def run(args) -> dict:
    ic50, drug_list, smiles_file = shared_paths(args.shared_data, *FILES)
    pairs = read_ic50(ic50)
    smiles = read_smiles(drug_list, smiles_file)
    prints = fingerprints(smiles)
    compound_of = compounds({d: smiles[d] for d in prints}, read_drug_names(drug_list))
    pairs = pairs[pairs.drug.isin(prints)].reset_index(drop=True)
    tables, records = gene_tables(args.shared_data, args.out, args.dims)
    base = read_similar_drugs(drug_list, compound_of, "drug")
    per_drug, chosen, inner, with_vector = {}, {}, {}, {}
    for variant, (names, grid) in VARIANTS.items():
        vectors = target_vectors(base.targets, [tables[n] for n in names])
        similar = replace(base, grid=grid, target_vectors=vectors)
        with_vector[variant] = sorted(vectors)
        records.setdefault("reach", {})[variant] = coverage(base.targets, vectors, [tables[n] for n in names])
        for seed in args.seeds:
            held = split_pairs(pairs, "drug", 0.2, seed, compound_of)
            train, test = pairs[~held], pairs[held]
            kernel, choice = choose_kernel(train, prints, replace(similar, seed=seed))
            predicted = Borrowing(train, test, prints, similar).predict(kernel, _cell_line_mean(train, test))
            truth, groups = test.ln_ic50.to_numpy(), scored_drugs(test.drug.to_numpy())
            for drug, score in pearson_of_each_drug(predicted, truth, groups).items():
                per_drug.setdefault(variant, {})[(seed, drug)] = score
            if variant == "none":  # the fallback of a drug with no similar drug, for the "alone" rows
                fallback = pearson_of_each_drug(_cell_line_mean(train, test), truth, groups)
                per_drug.setdefault("cell-line mean", {}).update({(seed, d): x for d, x in fallback.items()})
            chosen.setdefault(variant, []).append(kernel.label())
            inner.setdefault(variant, []).append(choice["score"])
            print(f"{variant} seed {seed}: {kernel.label()} (inner {choice['score']:.4f})", flush=True)
    return {"per_drug": per_drug, "chosen": chosen, "inner": inner, "records": records, "with_vector": with_vector}


def paired(scores: dict, reference: dict, drugs=None) -> str:
    """scores − reference per held-out drug (its mean over the seeds that held it out, so a drug
    held out twice is one unit), over `drugs` (default: every drug both scored), with a 95%
    interval over drugs."""
    by_drug: dict = {}
    for seed, drug in sorted(set(scores) & set(reference)):
        if drugs is None or drug in drugs:
            by_drug.setdefault(drug, []).append(scores[seed, drug] - reference[seed, drug])
    d = mean_interval([np.mean(values) for values in by_drug.values()])
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] over {d['n_units']} drugs"


def table(result: dict) -> str:
    none = result["per_drug"]["none"]
    lines = [
        "| variant | GDSC drugs with a target vector | held-out per-drug Pearson | − none [95%] | kernel chosen per seed (inner score) |",
        "|---|---:|---:|---|---|",
    ]
    for variant, scores in result["per_drug"].items():
        if variant not in result["chosen"]:  # the cell-line mean: no kernel
            lines.append(f"| {variant} | | {finite_mean(scores.values()):.3f} | {paired(scores, none)} | |")
            continue
        reach = len(result["with_vector"][variant])
        delta = "" if variant == "none" else paired(scores, none)
        picks = "; ".join(f"{k} ({s:.3f})" for k, s in zip(result["chosen"][variant], result["inner"][variant]))
        lines.append(f"| {variant} | {reach} | {finite_mean(scores.values()):.3f} | {delta} | {picks} |")
    lines += [
        "",
        "| one part alone | − cell-line mean [95%], every held-out drug | the same, held-out drugs with a target vector |",
        "|---|---|---|",
    ]
    fallback = result["per_drug"]["cell-line mean"]
    for variant in (v for v in result["per_drug"] if "alone" in v):
        scores, reached = result["per_drug"][variant], set(result["with_vector"][variant])
        lines.append(f"| {variant} | {paired(scores, fallback)} | {paired(scores, fallback, reached) if reached else 'n/a'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shared_data_option(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dims", type=int, default=32, help="width of the GRN embedding and the co-expression table")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/drug_priors"))
    args = parser.parse_args()
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = {
        **result,
        "per_drug": {v: {f"{s}:{d}": x for (s, d), x in scores.items()} for v, scores in result["per_drug"].items()},
    }
    (args.out / "results.json").write_text(json.dumps(saved, indent=1, default=str))
    print(json.dumps(result["records"], indent=1, default=str)[:3000])
    print(table(result))


if __name__ == "__main__":
    main()
