#!/usr/bin/env python
"""scvi-tools baselines (TotalVI protein imputation, MultiVI cross-modal alignment) for
benchmarks/crossmodal.py.

Standalone: it runs in a separate Python environment with scvi-tools (not a celltron dependency):

    python3.11 -m venv runs/scvi-py311 && runs/scvi-py311/bin/pip install torch==2.13.0 && \
        runs/scvi-py311/bin/pip install scvi-tools mudata        # scvi-tools 1.4.2 when measured
    runs/scvi-py311/bin/python benchmarks/scvi_peers.py --rna RNA.h5ad --other OTHER.h5ad --kind adt|atac \
        --split SPLIT.npz --out OUT.npz [--epochs N] [--seed S] [--batch-key KEY]

Inputs: RNA.h5ad / OTHER.h5ad hold raw integer counts (X) for the same cells in the same obs
order; SPLIT.npz holds integer row-index arrays ``train`` and ``test``.

kind=adt  (TotalVI, RNA -> protein for held-out cells)
    TotalVI is trained on training cells (RNA + proteins) together with the test cells, whose
    protein counts are set to 0 *before* any AnnData/MuData is built and which form their own
    batch ("query").  scvi-tools registers an all-zero protein block within a batch as missing
    proteins (protein batch mask): those entries get no protein likelihood, and an adversarial
    batch classifier is switched on automatically.  This is the "impute proteins for cells
    without them" recipe of the totalVI tutorials.  Predictions are
    ``get_normalized_expression(..., transform_batch=<training batch(es)>, return_mean=True)``,
    protein part, i.e. as if the test cells had been measured in a training batch.
    --totalvi-mode panel instead uses the ``panel_key`` argument that scvi-tools 1.4 added:
    test cells keep their RNA batch and only the protein *panel* differs (missing), so no
    transform_batch is needed.
    Saved: predicted (test x proteins, float32; foreground + background mean, protein count
    scale), predicted_foreground (denoised foreground only), protein_names, test.

kind=atac (MultiVI alignment)
    MultiVI is trained on training cells as paired cells plus every test cell twice: an
    expression-only copy (ATAC zeroed) and an accessibility-only copy (RNA zeroed), as in the
    MultiVI tutorial (organize_multiome_anndatas; here built directly as MuData, the API that
    scvi-tools 1.4 recommends).  MultiVI treats an all-zero modality as missing.
    Saved: latent_rna (test cells' expression-only copies), latent_other (accessibility-only
    copies), rows in test order, plus test.

Features: top 4,000 genes (seurat_v3 on training-cell counts; all genes if fewer), and for ATAC
the peaks detected in >= 1% of training cells.  Test-cell values of the other modality are never
used for feature selection or training.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # run as a script: benchmarks/ on sys.path would shadow the standard library's `tokenize`
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rna", required=True)
    p.add_argument("--other", required=True)
    p.add_argument("--kind", required=True, choices=["adt", "atac"])
    p.add_argument("--split", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--epochs", type=int, default=None, help="max epochs (default: 200 for adt, 100 for atac); early stopping stays on"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-key", default=None, help="obs column of RNA.h5ad with the experimental batch (optional)")
    p.add_argument("--n-genes", type=int, default=4000)
    p.add_argument("--min-peak-frac", type=float, default=0.01)
    p.add_argument("--n-samples", type=int, default=25, help="posterior samples averaged for TotalVI predictions")
    p.add_argument(
        "--n-latent", type=int, default=None, help="latent size (default: scvi-tools default; TOTALVI 20, MULTIVI sqrt(n_hidden))"
    )
    p.add_argument("--totalvi-mode", choices=["batch", "panel"], default="batch")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a 2-core box shared with other work, 2 OpenMP threads made small ops ~100x slower)",
    )
    return p.parse_args(argv)


def load_counts(path):
    import anndata as ad

    a = ad.read_h5ad(path)
    X = a.X
    if not sp.issparse(X):
        X = sp.csr_matrix(X)
    X = sp.csr_matrix(X, dtype=np.float32)
    a.X = X
    return a


def select_genes(rna_train_counts, var_names, n_top):
    """seurat_v3 HVGs computed on training-cell counts only; returns a boolean mask."""
    import anndata as ad
    import scanpy as sc

    detected = np.asarray((rna_train_counts > 0).sum(axis=0)).ravel() > 0
    if detected.sum() <= n_top:
        return detected
    tmp = ad.AnnData(rna_train_counts[:, detected].copy())
    tmp.var_names = np.asarray(var_names)[detected]
    sc.pp.highly_variable_genes(tmp, flavor="seurat_v3", n_top_genes=n_top)
    mask = np.zeros(len(var_names), dtype=bool)
    mask[np.flatnonzero(detected)[tmp.var["highly_variable"].to_numpy()]] = True
    return mask


def versions():
    import importlib.metadata as _ilm

    import lightning
    import scvi
    import torch

    v = {
        "scvi-tools": scvi.__version__,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "anndata": _ilm.version("anndata"),
    }
    try:
        import mudata

        v["mudata"] = mudata.__version__
    except Exception:
        pass
    try:
        import jax

        v["jax"] = jax.__version__
    except Exception:
        v["jax"] = None
    return v


def run_totalvi(rna, adt, train, test, args, batch):
    import anndata as ad
    import mudata as md
    import scvi

    gmask = select_genes(rna.X[train], rna.var_names, args.n_genes)
    order = np.concatenate([train, test])
    n_tr = len(train)

    X_rna = rna.X[order][:, gmask]
    Y = adt.X[order].toarray().astype(np.float32)
    Y[n_tr:] = 0.0  # test-cell proteins are never seen
    protein_names = np.asarray(adt.var_names).astype(str)

    obs_names = np.asarray(rna.obs_names)[order].astype(str)
    if batch is None:
        cell_batch = np.array(["train"] * len(order), dtype=object)
    else:
        cell_batch = np.asarray(batch)[order].astype(str).astype(object)
    train_batches = sorted(set(cell_batch[:n_tr]))
    if args.totalvi_mode == "batch":
        # test cells form their own batch with all-zero (= missing) proteins
        cell_batch = cell_batch.copy()
        cell_batch[n_tr:] = "query"
        panel = None
    else:
        panel = np.array(["measured"] * n_tr + ["missing"] * len(test), dtype=object)

    import pandas as pd

    obs = pd.DataFrame({"batch": pd.Categorical(cell_batch)}, index=obs_names)
    if panel is not None:
        obs["panel"] = pd.Categorical(panel)
    rna_ad = ad.AnnData(X=sp.csr_matrix(X_rna), obs=obs.copy())
    rna_ad.var_names = np.asarray(rna.var_names)[gmask].astype(str)
    # dense on purpose: with a sparse protein matrix scvi-tools 1.4.2 builds the protein batch
    # mask as np.matrix and TOTALVI.__init__ fails (IndexError in _get_totalvi_protein_priors)
    prot_ad = ad.AnnData(X=Y, obs=obs.copy())
    prot_ad.var_names = protein_names
    mdata = md.MuData({"rna": rna_ad, "protein": prot_ad})
    for c in obs.columns:
        mdata.obs[c] = obs[c].values

    setup_kw = dict(
        rna_layer=None,
        protein_layer=None,
        batch_key="batch",
        modalities={"rna_layer": "rna", "protein_layer": "protein", "batch_key": "rna"},
    )
    if panel is not None:
        setup_kw["panel_key"] = "panel"
        setup_kw["modalities"]["panel_key"] = "rna"
    scvi.model.TOTALVI.setup_mudata(mdata, **setup_kw)
    model = scvi.model.TOTALVI(mdata, **({"n_latent": args.n_latent} if args.n_latent else {}))
    if args.totalvi_mode == "panel":
        # in panel mode TOTALVI still switches the adversarial classifier on; it needs >1 batch
        adv = model.summary_stats.n_batch > 1
    else:
        adv = None
    epochs = args.epochs if args.epochs is not None else 200
    t0 = time.time()
    model.train(max_epochs=epochs, adversarial_classifier=adv, enable_progress_bar=False)
    t_train = time.time() - t0
    n_ep = int(model.history["elbo_train"].shape[0])

    test_rows = np.arange(n_tr, n_tr + len(test))
    tb = train_batches if args.totalvi_mode == "batch" else None
    common = dict(
        indices=test_rows,
        transform_batch=tb,
        n_samples=args.n_samples,
        return_mean=True,
        return_numpy=True,
        sample_protein_mixing=False,
    )
    _, pred_full = model.get_normalized_expression(mdata, include_protein_background=True, **common)
    _, pred_fg = model.get_normalized_expression(mdata, include_protein_background=False, **common)
    out = dict(
        predicted=np.asarray(pred_full, dtype=np.float32),
        predicted_foreground=np.asarray(pred_fg, dtype=np.float32),
        protein_names=protein_names,
        test=test,
        n_genes_used=np.int64(gmask.sum()),
    )
    info = dict(
        model="TOTALVI",
        totalvi_mode=args.totalvi_mode,
        epochs_run=n_ep,
        train_seconds=round(t_train, 1),
        n_genes=int(gmask.sum()),
        n_proteins=len(protein_names),
        transform_batch=tb,
    )
    return out, info


def run_multivi(rna, atac, train, test, args, batch):
    import anndata as ad
    import mudata as md
    import pandas as pd
    import scvi

    gmask = select_genes(rna.X[train], rna.var_names, args.n_genes)
    frac = np.asarray((atac.X[train] > 0).mean(axis=0)).ravel()
    pmask = frac >= args.min_peak_frac

    n_tr, n_te = len(train), len(test)
    R = rna.X[:, gmask]
    A = atac.X[:, pmask]
    zr = sp.csr_matrix((n_te, R.shape[1]), dtype=np.float32)
    za = sp.csr_matrix((n_te, A.shape[1]), dtype=np.float32)
    X_rna = sp.vstack([R[train], R[test], zr]).tocsr()
    X_atac = sp.vstack([A[train], za, A[test]]).tocsr()
    names = np.asarray(rna.obs_names).astype(str)
    obs_names = np.concatenate(
        [
            np.char.add(names[train], "_paired"),
            np.char.add(names[test], "_expression"),
            np.char.add(names[test], "_accessibility"),
        ]
    )
    modality = np.array(["paired"] * n_tr + ["expression"] * n_te + ["accessibility"] * n_te)
    obs = pd.DataFrame({"modality": pd.Categorical(modality)}, index=obs_names)
    cat_cov = None
    if batch is not None:
        b = np.asarray(batch).astype(str)
        obs["exp_batch"] = pd.Categorical(np.concatenate([b[train], b[test], b[test]]))
        cat_cov = ["exp_batch"]

    empty_r = np.asarray(X_rna[n_tr : n_tr + n_te].sum(axis=1)).ravel() == 0
    empty_a = np.asarray(X_atac[n_tr + n_te :].sum(axis=1)).ravel() == 0
    if empty_r.any() or empty_a.any():
        print(
            f"WARNING: {empty_r.sum()} test cells have no counts in the selected genes and "
            f"{empty_a.sum()} none in the selected peaks; their latents are uninformative",
            file=sys.stderr,
        )

    rna_ad = ad.AnnData(X=X_rna, obs=obs.copy())
    rna_ad.var_names = np.asarray(rna.var_names)[gmask].astype(str)
    atac_ad = ad.AnnData(X=X_atac, obs=obs.copy())
    atac_ad.var_names = np.asarray(atac.var_names)[pmask].astype(str)
    mdata = md.MuData({"rna": rna_ad, "atac": atac_ad})
    mods = {"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"}
    if cat_cov:
        mods["categorical_covariate_keys"] = "rna"
    scvi.model.MULTIVI.setup_mudata(
        mdata, rna_layer=None, atac_layer=None, batch_key="modality", categorical_covariate_keys=cat_cov, modalities=mods
    )
    model = scvi.model.MULTIVI(mdata, **({"n_latent": args.n_latent} if args.n_latent else {}))
    epochs = args.epochs if args.epochs is not None else 30
    t0 = time.time()
    model.train(max_epochs=epochs, enable_progress_bar=False)
    t_train = time.time() - t0
    n_ep = int(model.history["elbo_train"].shape[0])

    idx_e = np.arange(n_tr, n_tr + n_te)
    idx_a = np.arange(n_tr + n_te, n_tr + 2 * n_te)
    lat_r = model.get_latent_representation(mdata, indices=idx_e)
    lat_o = model.get_latent_representation(mdata, indices=idx_a)
    out = dict(
        latent_rna=np.asarray(lat_r, dtype=np.float32),
        latent_other=np.asarray(lat_o, dtype=np.float32),
        test=test,
        n_genes_used=np.int64(gmask.sum()),
        n_peaks_used=np.int64(pmask.sum()),
    )
    info = dict(
        model="MULTIVI",
        epochs_run=n_ep,
        n_latent=int(model.module.n_latent),
        train_seconds=round(t_train, 1),
        n_genes=int(gmask.sum()),
        n_peaks=int(pmask.sum()),
    )
    return out, info


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    import scvi
    import torch

    scvi.settings.seed = args.seed
    n_thr = max(1, args.threads)
    torch.set_num_threads(n_thr)
    scvi.settings.dl_num_workers = 0
    warnings.filterwarnings("ignore", message=".*num_workers.*")

    rna = load_counts(args.rna)
    other = load_counts(args.other)
    if rna.n_obs != other.n_obs or not np.array_equal(rna.obs_names, other.obs_names):
        sys.exit("RNA and OTHER must hold the same cells in the same obs order")
    sp_ = np.load(args.split)
    train = np.asarray(sp_["train"], dtype=np.int64)
    test = np.asarray(sp_["test"], dtype=np.int64)
    if np.intersect1d(train, test).size:
        sys.exit("train and test overlap")
    if train.min() < 0 or test.min() < 0 or max(train.max(), test.max()) >= rna.n_obs:
        sys.exit("split indices out of range")
    batch = None
    if args.batch_key is not None:
        if args.batch_key not in rna.obs:
            sys.exit(f"--batch-key {args.batch_key!r} not in RNA obs")
        batch = rna.obs[args.batch_key].astype(str).to_numpy()

    if args.epochs is None:
        args.epochs = 200 if args.kind == "adt" else 100
    if args.kind == "adt":
        out, info = run_totalvi(rna, other, train, test, args, batch)
    else:
        out, info = run_multivi(rna, other, train, test, args, batch)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **out)
    summary = dict(
        kind=args.kind,
        runtime_seconds=round(time.time() - t_start, 1),
        n_train=int(len(train)),
        n_test=int(len(test)),
        epochs=args.epochs,
        seed=args.seed,
        batch_key=args.batch_key,
        threads=n_thr,
        out=args.out,
        versions=versions(),
        **info,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
