"""Regenerate the gene tables bundled in celltron/data/genes from reference/ of the project's shared
data ($CELLTRON_SHARED_DATA, else the folder shared/data beside the repository).

Run once when the upstream references change:  python tools/bundle_reference_data.py
The package itself never reads pickles or the BioMart exports at run time.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from celltron._safe_pickle import load_restricted_pickle  # noqa: E402

REFERENCE = Path(os.environ.get("CELLTRON_SHARED_DATA") or ROOT.parent / "shared" / "data") / "reference"
OUT = ROOT / "celltron" / "data" / "genes"


def write_json_gz(obj, path: Path) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as handle:
        handle.write(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def biomart_genes(csv_path: Path) -> dict[str, str]:
    """Ensembl gene ID -> gene name (first non-empty name seen) from a BioMart export."""
    genes: dict[str, str] = {}
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            gene_id, name = row["Gene stable ID"], row["Gene name"]
            if gene_id not in genes or (not genes[gene_id] and name):
                genes[gene_id] = name
    return genes


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    mapping = load_restricted_pickle(REFERENCE / "geneformer" / "V2" / "ensembl_mapping_dict_gc104M.pkl")
    write_json_gz({str(k): str(v) for k, v in mapping.items()}, OUT / "human_symbol_to_ensembl.json.gz")
    orthologs = REFERENCE / "orthologs"
    write_json_gz(biomart_genes(orthologs / "ensembl_biomart_human_to_mouse.csv"), OUT / "human_ensembl_to_symbol.json.gz")
    write_json_gz(biomart_genes(orthologs / "ensembl_biomart_mouse_to_human.csv"), OUT / "mouse_ensembl_to_symbol.json.gz")
    bundle_orthologs(orthologs / "human_mouse_one2one_orthologs.tsv", OUT / "orthologs_human_mouse.tsv.gz")
    bundle_vocabularies(OUT.parent / "vocab")
    print(f"wrote gene tables to {OUT} and vocabularies to {OUT.parent / 'vocab'}")


def bundle_orthologs(source: Path, out: Path) -> None:
    """One-to-one orthologs: anchor (human) gene, other species' gene, orthology confidence."""
    lines = ["human\tmouse\tconfidence"]
    with open(source, newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            lines.append(f"{row['human_ensembl_gene_id']}\t{row['mouse_ensembl_gene_id']}\t{row['orthology_confidence']}")
    with gzip.GzipFile(out, "wb", mtime=0) as handle:
        handle.write(("\n".join(lines) + "\n").encode())


def bundle_vocabularies(out: Path) -> None:
    """Geneformer token + median dictionaries and the scGPT whole-human vocab, as JSON."""
    out.mkdir(parents=True, exist_ok=True)
    geneformer = REFERENCE / "geneformer"
    for version, suffix in (("v1", "V1/{}_gc30M.pkl"), ("v2", "V2/{}_gc104M.pkl")):
        tokens = load_restricted_pickle(geneformer / suffix.format("token_dictionary"))
        medians = load_restricted_pickle(geneformer / suffix.format("gene_median_dictionary"))
        write_json_gz(
            {"tokens": {str(k): int(v) for k, v in tokens.items()}, "medians": {str(k): float(v) for k, v in medians.items()}},
            out / f"geneformer_{version}.json.gz",
        )
    scgpt = json.loads((REFERENCE / "scgpt" / "scGPT_human_vocab.json").read_text())
    write_json_gz({str(k): int(v) for k, v in scgpt.items()}, out / "scgpt_human.json.gz")


if __name__ == "__main__":
    main()
