"""Regenerate tests/data, the real data the test suite runs on, from the project's shared data.

    python tests/data/make_test_data.py [--shared ../shared/data]

The shared data folder (default: $CELLTRON_SHARED_DATA, else ../shared/data beside the repository)
holds the full reference sets with their PROVENANCE files. This script copies the few files the
tests read into tests/data under the same relative paths, trimmed where the tests allow it, and
prints each file's size and sha256 for tests/data/PROVENANCE.md. It is deterministic: run twice
(with the same anndata and h5py), it writes the same bytes.

- PBMC 4k, Papalexi screen, GDSC tables: copied byte for byte.
- Mouse pancreas / dentate gyrus: the same AnnData (every matrix, layer, obs and var equal),
  rewritten with gzip level 9 (the shared files are uncompressed): about 3x smaller.
- Human-mouse one-to-one orthologs: the two Ensembl id columns the tests read, every row.
- PBMC 3k is not copied: the package bundles the same file (celltron/data/demo/pbmc3k_raw.h5ad).
- TRRUST is not copied: its redistribution terms are not verified; the tests that need it skip
  without the shared data.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent

COPIED = [
    "scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad",
    "perturbation/papalexi2021_thp1_lowmoi_sceptredata.h5ad",
    "perturbation/norman2019_k562_crispra_3375cells.h5ad",
    "drug/GDSC_IC50_deepcdr_scfoundation.csv",
    "drug/GDSC_drug_list_2019-06-24.csv",
    "drug/DeepCDR_223drugs_pubchem_smiles.txt",
]
RECOMPRESSED = [
    "scrna/mouse/pancreas_50obs.h5ad",
    "scrna/mouse/dentategyrus_100obs.h5ad",
]
ORTHOLOGS = "reference/orthologs/human_mouse_one2one_orthologs.tsv"
# Paired multi-omics: the same seeded sample of cells in both files of a pair; TEA-seq's RNA keeps
# its 2,000 genes with the most counts (the whole table is 9,855 genes), everything else whole.
MULTIOMICS = {
    "multiomics/teaseq_pbmc_1262cells_rna.h5ad": ("multiomics/teaseq_pbmc_300cells_rna.h5ad", 2000),
    "multiomics/teaseq_pbmc_1262cells_adt.h5ad": ("multiomics/teaseq_pbmc_300cells_adt.h5ad", None),
    "multiomics/snareseq_mouse_cortex_10309cells_rna.h5ad": ("multiomics/snareseq_mouse_cortex_300cells_rna.h5ad", None),
    "multiomics/snareseq_mouse_cortex_10309cells_atac.h5ad": ("multiomics/snareseq_mouse_cortex_300cells_atac.h5ad", None),
}
MULTIOMICS_CELLS = 300
ORTHOLOG_COLUMNS = ["human_ensembl_gene_id", "mouse_ensembl_gene_id"]


def _recompress(source: Path, target: Path) -> None:
    import anndata as ad
    import numpy as np
    import pandas as pd

    adata = ad.read_h5ad(source)
    adata.write_h5ad(target, compression="gzip", compression_opts=9)
    again = ad.read_h5ad(target)
    for name in [None, *adata.layers]:
        a, b = (adata.X, again.X) if name is None else (adata.layers[name], again.layers[name])
        assert (a != b).nnz == 0 and a.dtype == b.dtype, f"{target}: {name or 'X'} changed"
    pd.testing.assert_frame_equal(adata.obs, again.obs)
    pd.testing.assert_frame_equal(adata.var, again.var)
    assert np.array_equal(adata.obs_names, again.obs_names) and np.array_equal(adata.var_names, again.var_names)


def _trim_paired(source: Path, target: Path, top_genes: int | None) -> None:
    """A seeded sample of MULTIOMICS_CELLS cells (seed 0, the same for both files of a pair: they
    have the same cells in the same order), optionally the genes with the most counts."""
    import anndata as ad
    import numpy as np

    adata = ad.read_h5ad(source)
    keep = np.sort(np.random.default_rng(0).choice(adata.n_obs, MULTIOMICS_CELLS, replace=False))
    adata = adata[keep]
    if top_genes is not None:
        totals = np.asarray(adata.X.sum(0)).ravel()
        adata = adata[:, np.sort(np.argsort(-totals, kind="stable")[:top_genes])]
    adata.copy().write_h5ad(target, compression="gzip", compression_opts=9)


def _orthologs(source: Path, target: Path) -> None:
    with open(source, newline="") as handle, open(target, "w", newline="") as out:
        writer = csv.writer(out, delimiter="\t", lineterminator="\n")
        writer.writerow(ORTHOLOG_COLUMNS)
        for row in csv.DictReader(handle, delimiter="\t"):
            writer.writerow([row[column] for column in ORTHOLOG_COLUMNS])


def main(argv: list[str] | None = None) -> int:
    default = os.environ.get("CELLTRON_SHARED_DATA") or HERE.parents[2] / "shared" / "data"  # ../shared/data
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared", type=Path, default=Path(default), help="the project's shared data folder (default: %(default)s)"
    )
    shared = parser.parse_args(argv).shared
    wanted = [*COPIED, *RECOMPRESSED, ORTHOLOGS, *MULTIOMICS]
    missing = [name for name in wanted if not (shared / name).exists()]
    if missing:
        parser.error(f"not in {shared}: {', '.join(missing)} (pass --shared or set CELLTRON_SHARED_DATA)")
    for name in wanted:
        target = HERE / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name in COPIED:
            shutil.copyfile(shared / name, target)
        elif name in RECOMPRESSED:
            _recompress(shared / name, target)
        elif name in MULTIOMICS:
            trimmed, top_genes = MULTIOMICS[name]
            _trim_paired(shared / name, HERE / trimmed, top_genes)
        else:
            _orthologs(shared / name, target)
    total = 0
    for name in [MULTIOMICS[w][0] if w in MULTIOMICS else w for w in wanted]:
        data = (HERE / name).read_bytes()
        total += len(data)
        print(f"| {name} | {len(data)} | {hashlib.sha256(data).hexdigest()} |")
    print(f"total {total} bytes ({total / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
