"""Test helpers: write real data in other input formats, and read a corpus back whole."""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp


def write_10x_h5(adata: ad.AnnData, path: Path, gene_ids: np.ndarray, feature_types=None, genome: str = "GRCh38") -> None:
    """Cell Ranger 3 layout: /matrix with CSC genes x cells (= CSR cells x genes) and features
    (`feature_types`: per feature, default all "Gene Expression")."""
    x = sp.csr_matrix(adata.X).astype(np.int32)
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array(adata.obs_names, dtype="S")
        m["data"], m["indices"], m["indptr"] = x.data, x.indices, x.indptr
        m["shape"] = np.array([adata.n_vars, adata.n_obs], dtype=np.int32)
        feats = m.create_group("features")
        feats["id"] = np.array(gene_ids, dtype="S")
        feats["name"] = np.array(adata.var_names, dtype="S")
        kinds = ["Gene Expression"] * adata.n_vars if feature_types is None else list(feature_types)
        feats["feature_type"] = np.array(kinds, dtype="S")
        feats["genome"] = np.array([genome] * adata.n_vars, dtype="S")


def write_mtx_dir(adata: ad.AnnData, directory: Path, gene_ids: np.ndarray) -> None:
    """Cell Ranger 3 mtx directory: gzipped matrix (genes x cells), features, barcodes."""
    directory.mkdir(parents=True)
    with gzip.open(directory / "matrix.mtx.gz", "wb") as f:
        scipy.io.mmwrite(f, sp.csr_matrix(adata.X).T.astype(np.int64).tocoo())
    features = pd.DataFrame({"id": gene_ids, "name": adata.var_names, "type": "Gene Expression"})
    features.to_csv(directory / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(adata.obs_names).to_csv(directory / "barcodes.tsv.gz", sep="\t", header=False, index=False)


def human_table() -> dict[str, str]:
    raw = resources.files("celltron.data.genes").joinpath("human_symbol_to_ensembl.json.gz").read_bytes()
    return json.loads(gzip.decompress(raw))


def expected_counts(adata: ad.AnnData, ensembl_of_gene: list[str]) -> pd.DataFrame:
    """Cells x Ensembl IDs, duplicates summed, unmapped ('') dropped, via an indicator matrix."""
    ensembl = np.asarray(ensembl_of_gene, dtype=object)
    mapped = np.flatnonzero(ensembl != "")
    targets, column = np.unique(ensembl[mapped].astype(str), return_inverse=True)
    indicator = sp.csr_matrix((np.ones(len(mapped)), (mapped, column)), shape=(len(ensembl), len(targets)))
    summed = (sp.csr_matrix(adata.X, dtype=np.float64) @ indicator).toarray()
    return pd.DataFrame(summed, index=adata.obs_names, columns=targets)


def read_corpus(directory: Path, split: str | None = None) -> ad.AnnData:
    """All shards of a corpus (one split or both) as one in-memory AnnData."""
    manifest = json.loads((directory / "manifest.json").read_text())
    splits = [split] if split else ["train", "val"]
    parts = [ad.read_zarr(directory / rec["path"]) for s in splits for rec in manifest["splits"][s]["shards"]]
    return ad.concat(parts, merge="same")
