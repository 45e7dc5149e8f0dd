"""The scvi-tools peers of the cross-modal tasks, run on the task's own splits (`crossmodal.peers`):

- totalvi (predict): TotalVI trained on the training cells (RNA + proteins) together with the
  held-out cells, whose protein counts are set to zero before any AnnData is built and which form
  their own batch. scvi-tools treats an all-zero protein block within a batch as
  missing proteins (no protein likelihood) and switches its adversarial batch classifier on: the
  totalVI tutorials' recipe for imputing proteins of cells without them. Predictions are the
  posterior mean protein expression (foreground + background, protein count scale) as if the
  held-out cells had been measured in a training batch (`transform_batch`).
- multivi (align, RNA + chromatin): MultiVI trained on the training cells as paired cells plus
  every held-out cell twice, an expression-only copy (chromatin zeroed) and an accessibility-only
  copy (RNA zeroed), as in the MultiVI tutorial; the two copies' latents are the alignment.

Features: the top `genes` genes by seurat_v3 on training-cell counts (all detected genes if
fewer), and for chromatin the peaks detected in at least `min_peak_frac` of training cells. Held-
out cells' values of the other modality are never used for features or training.

scvi-tools is optional (`pip install 'celltron[scvi]'`); it installs beside celltron's pins.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltron.errors import ConfigError

PEERS = {"totalvi": ("predict", "rna", "adt"), "multivi": ("align", "rna", "atac")}  # peer: (task, modalities)
DEFAULT_EPOCHS = {"totalvi": 200, "multivi": 100}
HELD_OUT_BATCH = "celltron:held-out"  # the held-out cells' own batch (their proteins missing)


@dataclass(frozen=True)
class PeerSettings:
    epochs: int = 0  # 0: DEFAULT_EPOCHS (early stopping stays as scvi-tools sets it)
    genes: int = 4000
    min_peak_frac: float = 0.01
    samples: int = 25  # TotalVI posterior samples averaged per prediction

    def epochs_of(self, peer: str) -> int:
        return self.epochs or DEFAULT_EPOCHS[peer]


def require_scvi(peer: str) -> None:
    """Refuse a named peer early, before any data is read, when scvi-tools is not installed."""
    try:
        import mudata  # noqa: F401
        import scvi  # noqa: F401
        import skmisc  # noqa: F401  (seurat_v3's loess)
    except ImportError as error:
        raise ConfigError(
            f"crossmodal.peers names {peer}, which needs scvi-tools, mudata and scikit-misc ({error}); "
            "install them with: pip install 'celltron[scvi]' (or drop the peer)"
        ) from None


def check_peer(peer: str, task: str, modalities: tuple[str, str], where: str) -> None:
    """`peer` runs with `task` on these (source, target) modalities (canonical names), or is refused."""
    if peer not in PEERS:
        raise ConfigError(f"{where}: crossmodal.peers: unknown peer {peer!r}; choose from {sorted(PEERS)}")
    wanted_task, *wanted = PEERS[peer]
    pair_ok = tuple(modalities) == tuple(wanted) if task == "predict" else set(modalities) == set(wanted)
    if task != wanted_task or not pair_ok:
        raise ConfigError(
            f"{where}: crossmodal.peers: {peer} runs with the {wanted_task} task on --source {wanted[0]} --target "
            f"{wanted[1]}, not {task} on --source {modalities[0]} --target {modalities[1]}"
        )


def _dense_float(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)


def _csr_float(x) -> sp.csr_matrix:
    return sp.csr_matrix(x, dtype=np.float32)


def variable_genes(train_counts: sp.csr_matrix, n_top: int) -> np.ndarray:
    """Boolean mask of seurat_v3's `n_top` most variable genes over training-cell counts, among
    the detected genes (scanpy's selection, `tokenizers.hvg`); every detected gene when fewer."""
    from celltron.tokenizers.hvg import highly_variable_genes

    detected = np.asarray((train_counts > 0).sum(axis=0)).ravel() > 0
    if detected.sum() <= n_top:
        return detected
    return highly_variable_genes(train_counts, n_top, "seurat_v3", expressed_only=True).highly_variable


def _modality(values, obs: pd.DataFrame, prefix: str):
    """One MuData modality; feature names unique across modalities (MuData joins them)."""
    import anndata as ad

    return ad.AnnData(values, obs=obs.copy(), var=pd.DataFrame(index=[f"{prefix}{i}" for i in range(values.shape[1])]))


def _seeded(seed: int) -> None:
    import scvi

    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0


def totalvi_proteins(rna, proteins, train, test, seed: int, settings: PeerSettings, batches=None) -> tuple[np.ndarray, dict]:
    """Predicted protein counts (held-out cells x proteins) from TotalVI (module docstring), and a
    record of the run (epochs, seconds, genes)."""
    import mudata as md
    import scvi

    _seeded(seed)
    rna = _csr_float(rna)
    genes = variable_genes(rna[train], settings.genes)
    order = np.concatenate([train, test])
    values = _dense_float(proteins[order])  # dense: a sparse protein matrix fails TOTALVI's prior set-up
    values[len(train) :] = 0.0  # held-out cells' proteins are never seen
    batch = (
        np.full(len(order), "train", dtype=object) if batches is None else np.asarray(batches)[order].astype(str).astype(object)
    )
    training_batches = sorted(set(batch[: len(train)]))
    batch[len(train) :] = HELD_OUT_BATCH
    obs = pd.DataFrame({"batch": pd.Categorical(batch)}, index=pd.Index([f"cell{i}" for i in order]))
    data = md.MuData({"rna": _modality(rna[order][:, genes], obs, "gene"), "protein": _modality(values, obs, "protein")})
    data.obs["batch"] = obs["batch"].to_numpy()
    scvi.model.TOTALVI.setup_mudata(
        data, batch_key="batch", modalities={"rna_layer": "rna", "protein_layer": "protein", "batch_key": "rna"}
    )
    model = scvi.model.TOTALVI(data)
    started = time.time()
    model.train(max_epochs=settings.epochs_of("totalvi"), enable_progress_bar=False)
    seconds = time.time() - started
    _, predicted = model.get_normalized_expression(
        data,
        indices=np.arange(len(train), len(order)),
        transform_batch=training_batches,
        n_samples=settings.samples,
        return_mean=True,
        return_numpy=True,
        include_protein_background=True,
        sample_protein_mixing=False,
    )
    record = {"epochs_run": len(model.history["elbo_train"]), "train_seconds": round(seconds, 1), "genes": int(genes.sum())}
    return np.asarray(predicted, dtype=np.float32), record


def multivi_latents(rna, atac, train, test, seed: int, settings: PeerSettings, batches=None) -> tuple[dict, dict]:
    """MultiVI latents (module docstring): {"paired": training cells, "rna": held-out cells'
    expression-only copies, "atac": their accessibility-only copies}, and a run record."""
    import mudata as md
    import scvi

    _seeded(seed)
    rna, atac = _csr_float(rna), _csr_float(atac)
    genes = variable_genes(rna[train], settings.genes)
    peaks = np.asarray((atac[train] > 0).mean(axis=0)).ravel() >= settings.min_peak_frac
    expression, accessibility = rna[:, genes], atac[:, peaks]
    n_train, n_test = len(train), len(test)
    no_rna = sp.csr_matrix((n_test, expression.shape[1]), dtype=np.float32)
    no_atac = sp.csr_matrix((n_test, accessibility.shape[1]), dtype=np.float32)
    kind = np.array(["paired"] * n_train + ["expression"] * n_test + ["accessibility"] * n_test)
    obs = pd.DataFrame({"modality": pd.Categorical(kind)}, index=pd.Index([f"copy{i}" for i in range(len(kind))]))
    covariates = None
    if batches is not None:
        batch = np.asarray(batches).astype(str)
        obs["experimental_batch"] = pd.Categorical(np.concatenate([batch[train], batch[test], batch[test]]))
        covariates = ["experimental_batch"]
    data = md.MuData(
        {
            "rna": _modality(sp.vstack([expression[train], expression[test], no_rna]).tocsr(), obs, "gene"),
            "atac": _modality(sp.vstack([accessibility[train], no_atac, accessibility[test]]).tocsr(), obs, "peak"),
        }
    )
    modalities = {"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"}
    if covariates:
        modalities["categorical_covariate_keys"] = "rna"
    scvi.model.MULTIVI.setup_mudata(data, batch_key="modality", categorical_covariate_keys=covariates, modalities=modalities)
    model = scvi.model.MULTIVI(data)
    started = time.time()
    model.train(max_epochs=settings.epochs_of("multivi"), enable_progress_bar=False)
    seconds = time.time() - started
    latent = model.get_latent_representation(data)
    latents = {
        "paired": latent[:n_train],
        "rna": latent[n_train : n_train + n_test],
        "atac": latent[n_train + n_test :],
    }
    record = {
        "epochs_run": len(model.history["elbo_train"]),
        "train_seconds": round(seconds, 1),
        "genes": int(genes.sum()),
        "peaks": int(peaks.sum()),
    }
    return {k: np.asarray(v, dtype=np.float32) for k, v in latents.items()}, record
