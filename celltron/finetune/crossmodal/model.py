"""A pretrained model in the cross-modal tasks: its frozen cell embedding of each cell's RNA, and
the heads built on it.

Any model folder works for the RNA embedding: an RNA model, a joint multi-modal model (its
tokenizer gives RNA-only sequences, which it was also trained to read) or a paired export's RNA
tower. The other modality is read by a joint model's own tokens, or by a paired export's second
tower (its `paired/` dual encoder, whose projections put both modalities in one space). The cells are
tokenised by the model's own tokenizer after their genes are mapped to Ensembl IDs, and embedded
once in eval mode (no dropout): a function of each cell alone, so held-out cells' embeddings carry
nothing of their proteins or of other cells.

The prediction head is ridge regression from the standardised embedding to the CLR proteins
(alpha by inner CV on training cells, like the ridge baseline's). The anchored head predicts the
best baseline plus w x (model − best baseline), w chosen by `report.choose_weight` over inner folds
of the training cells, proteins as units (w = 0 is the baseline exactly).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from sklearn.model_selection import KFold

from celltron.errors import InputError
from celltron.finetune.crossmodal import baselines as bl
from celltron.finetune.crossmodal.data import PairedCells
from celltron.finetune.crossmodal.evaluate import per_protein_scores
from celltron.finetune.report import UnitScore, anchor, choose_weight

log = logging.getLogger(__name__)


def rna_lab_data(paired: PairedCells, modality: str = "rna", species: str | None = None, min_mapped_fraction: float = 0.5):
    """The paired cells' RNA as `LabData` (genes mapped to Ensembl IDs by the rule every verb uses)."""
    from celltron.corpus.genes import map_input_genes
    from celltron.lab.data import LabData

    counts = paired.counts[modality]
    gene_counts = np.asarray(counts.sum(axis=0, dtype=np.float64)).ravel()
    mapping = map_input_genes(paired.features[modality], species, str(paired.files[modality]), gene_counts, min_mapped_fraction)
    return LabData(
        paired.files[modality],
        paired.obs.reset_index(drop=True),
        paired.features[modality],
        counts,
        mapping.ensembl_ids,
        mapping.species,
        paired.cell_names,
        gene_counts,
        min_mapped_fraction,
    )


class ModelViews:
    """Frozen cell embeddings of paired cells by the model in `folder`: of each cell's RNA alone
    (any model) and, for a joint model whose tokens include the target modality or a paired
    export with a tower for it, of each modality alone in the model's shared space and of both. The target's features are mapped onto the model's:
    proteins by canonical antigen name (the panel must be the model's, in any order), chromatin
    peaks into the model's genomic bins (bins the model lacks are dropped)."""

    def __init__(self, folder, paired: PairedCells, target: str, batch_size: int, seed: int, data_section=None):
        from pathlib import Path

        from celltron.lab.data import check_vocabulary_coverage, load_model_tokenizer

        options = (
            {}
            if data_section is None
            else {"species": data_section.species, "min_mapped_fraction": data_section.min_mapped_fraction}
        )
        self.folder, self.paired, self.target, self.batch_size, self.seed = Path(folder), paired, target, batch_size, seed
        lab = rna_lab_data(paired, **options)
        self.tokenizer = load_model_tokenizer(folder, lab)
        check_vocabulary_coverage(lab, self.tokenizer.vocab)
        self.block = _rna_block(lab)
        self.pad_id = self.tokenizer.vocab.special_id("pad")
        self.dual, self.pair_tokens = _paired_towers(self.folder, target)
        features = (
            self.pair_tokens.features if self.pair_tokens is not None else getattr(self.tokenizer, "features", {}).get(target)
        )
        self.target_cells = None if features is None else _target_cells(features, paired, target)

    @property
    def reads_target(self) -> bool:
        """A joint model trained on the target modality's tokens, or a paired one with a target tower."""
        return self.target_cells is not None

    def _embed(self, tokens) -> np.ndarray:
        from celltron.finetune.annotate import frozen_cell_embeddings

        return frozen_cell_embeddings(self.folder, tokens, self.pad_id, self.batch_size)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def rna(self) -> np.ndarray:
        """The RNA model's cell embedding (a paired export: its RNA tower's, before projection)."""
        return self._embed(self.tokenizer.encode_block(self.block, self._rng()))

    def rna_dropout_passes(self, passes: int) -> np.ndarray:
        """(passes, cells, hidden): `rna`'s embedding with the encoder's dropout on (MC dropout;
        the same tokens, seeded)."""
        from celltron.finetune.annotate import frozen_cell_embeddings

        tokens = self.tokenizer.encode_block(self.block, self._rng())
        return frozen_cell_embeddings(self.folder, tokens, self.pad_id, self.batch_size, passes, self.seed)

    def joint(self) -> np.ndarray:
        """Both modalities: one sequence of RNA and target tokens (a joint model), or both towers'
        projections side by side (a paired one)."""
        if self.dual is not None:
            return np.hstack(self.aligned())
        tokens = self.tokenizer.encode(self.block, {self.target: self.target_cells}, self._rng())
        return self._embed(tokens)

    def aligned(self) -> tuple[np.ndarray, np.ndarray]:
        """Each modality embedded alone, in the space the model puts both in: a joint model's cell
        embedding of RNA tokens and of target tokens; a paired model's two projections (the space
        its contrastive loss aligned)."""
        if self.dual is None:
            empty = _empty_block(self.block)
            target = self._embed(self.tokenizer.encode(empty, {self.target: self.target_cells}, self._rng()))
            return self.rna(), target
        rna_tokens = self.tokenizer.encode_block(self.block, self._rng())
        pair_tokens = self.pair_tokens.encode(self.target_cells, self._rng())
        tower = self.dual.encoders[self.target]
        pad_value = float(getattr(tower.config, "pad_value", 0.0))
        return (
            projected(self.dual, "rna", rna_tokens, self.pad_id, 0.0, self.batch_size),
            projected(self.dual, self.target, pair_tokens, 0, pad_value, self.batch_size),
        )


def masked_value_predictions(views: ModelViews) -> np.ndarray | None:
    """(cells, the data's panel order) a joint model's zero-shot prediction of each cell's protein
    values: its RNA tokens and every panel protein's token with the value hidden (the model's
    mask_value), read from the masked-value head that pretraining trained. The proteins' measured
    values never enter: the tokens are built from a constant panel, then every value is masked.
    Values are on the model's protein scale (its per-cell CLR bins, or CLR when continuous).
    None for a model without such a head (a paired export, an RNA model, a family that predicts
    no values) or whose protein budget is shorter than its panel (it never saw every protein in
    one sequence). The input is scGPT's masked-value input (the value set to mask_value, no
    generative flag): what `data.generative: false` pretraining, the default, trains."""
    import torch

    from celltron.lab.inference import autocast, pad_cells, pick_device, to_device
    from celltron.model_zoo.registry import load_pretrained
    from celltron.tokenizers.multimodal import MODALITY_IDS

    target, tokenizer = views.target, views.tokenizer
    if views.dual is not None or target != "adt" or target not in getattr(tokenizer, "features", {}):
        return None
    n_panel = len(tokenizer.features[target])
    if tokenizer.settings.adt_budget < n_panel:
        log.warning(
            "%s: protein budget %d < its panel of %d: no masked-value predictions",
            views.folder,
            tokenizer.settings.adt_budget,
            n_panel,
        )
        return None
    model = load_pretrained(views.folder)
    mask_value = getattr(model.config, "mask_value", None)
    if mask_value is None:
        return None
    constant = sp.csr_matrix(np.ones((views.paired.n_cells, n_panel), dtype=np.float32))
    tokens = tokenizer.encode(views.block, {target: _as_modality_cells(constant)}, views._rng())
    is_protein = tokens.modality_ids == MODALITY_IDS[target]
    tokens.values[is_protein] = mask_value
    device = pick_device("auto")
    model = model.to(device).eval()
    pad_value = float(getattr(model.config, "pad_value", 0.0))
    predicted = np.full((views.paired.n_cells, n_panel), np.nan, dtype=np.float32)
    first_id = tokenizer.first_id[target]
    with torch.no_grad():
        for start in range(0, views.paired.n_cells, views.batch_size):
            rows = np.arange(start, min(start + views.batch_size, views.paired.n_cells))
            batch = pad_cells(tokens, rows, views.pad_id)
            batch["values"][batch["attention_mask"] == 0] = pad_value
            with autocast(device):
                expression = model(**to_device(batch, device)).expression.float().cpu().numpy()
            proteins = batch["modality_ids"].numpy() == MODALITY_IDS[target]
            cell, position = np.nonzero(proteins)
            predicted[rows[cell], batch["input_ids"].numpy()[cell, position] - first_id] = expression[cell, position]
    return predicted[:, np.argsort(_panel_columns(views.paired, tokenizer.features[target]))]


def _panel_columns(paired: PairedCells, model_features) -> np.ndarray:
    """For each of the model's proteins, the data's column (the panels match by canonical name)."""
    from celltron.corpus.proteins import canonical_proteins
    from celltron.finetune.crossmodal.data import align_panel

    where = f"{paired.files['adt']} (adt)"
    names = canonical_proteins(paired.features["adt"], where).canonical
    return np.asarray(
        align_panel(names, np.asarray(model_features).astype(str), where, "protein panel (canonical antigen names)")
    )


MIN_CALIBRATION_CELLS = 20


def calibrated(values: np.ndarray, targets: np.ndarray, train: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
    """Per protein, the least-squares line from `values` to `targets` fitted on training cells
    (those outside `seen`, the cells the model was pretrained on, when at least
    MIN_CALIBRATION_CELLS are), applied to every cell (a constant column predicts the mean)."""
    if seen is not None and (~seen[train]).sum() >= MIN_CALIBRATION_CELLS:
        train = train[~seen[train]]
    x, y = values[train], targets[train]
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    variance = ((x - x_mean) ** 2).mean(axis=0)
    slope = np.divide(((x - x_mean) * (y - y_mean)).mean(axis=0), variance, out=np.zeros_like(variance), where=variance > 0)
    return y_mean + (values - x_mean) * slope


def _as_modality_cells(counts: sp.csr_matrix):
    from celltron.tokenizers.multimodal import ModalityCells

    return ModalityCells(counts.indptr, counts.indices, counts.data, np.ones(counts.shape[0], dtype=bool))


def _paired_towers(folder, target: str):
    """A paired export's dual encoder and its pair tower's tokens, when its tower reads `target`."""
    from celltron.errors import InputError
    from celltron.model_zoo.contrastive import CONFIG_FILE, PAIR_TOKENS_FILE, PAIRED_DIR, DualEncoder
    from celltron.tokenizers.multimodal import PairTokens

    paired = folder / PAIRED_DIR
    if not (paired / CONFIG_FILE).exists():
        return None, None
    dual = DualEncoder.from_pretrained(paired).eval()
    if target not in dual.modalities:
        return None, None
    if not (paired / PAIR_TOKENS_FILE).exists():
        raise InputError(
            f"{paired}: no {PAIR_TOKENS_FILE} (the {target} tower's token settings and features); export the run again "
            "with this version (celltron export CHECKPOINT --out DIR)"
        )
    return dual, PairTokens.load(paired / PAIR_TOKENS_FILE)


def projected(dual, modality: str, tokens, pad_id: int, pad_value: float, batch_size: int) -> np.ndarray:
    """(cells, projection_dim) L2-normalised projections of one modality's tokens by the dual
    encoder, in eval mode, on the GPU when there is one."""
    import torch

    from celltron.lab.inference import autocast, pad_cells, pick_device, to_device

    device = pick_device("auto")
    dual = dual.to(device).eval()
    order = np.argsort(tokens.lengths, kind="stable")
    out = np.zeros((len(tokens), dual.projection_dim), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = pad_cells(tokens, rows, pad_id)
            if "values" in batch:
                batch["values"][batch["attention_mask"] == 0] = pad_value
            with autocast(device):
                out[rows] = dual.embed(modality, to_device(batch, device)).float().cpu().numpy()
    return out


def _rna_block(lab):
    """The RNA counts as the tokenizers' `Block` over the mapped genes (as `lab.data.tokenize_counts`)."""
    from celltron.corpus.readers import to_corpus_genes
    from celltron.tokenizers.rank_value import is_float32
    from celltron.tokenizers.schemes import Block

    unique, column_map = lab.mapped_genes()
    mapped = to_corpus_genes(lab.counts, column_map, len(unique))
    totals = np.asarray(lab.counts.sum(axis=1)).ravel()
    species = [lab.species] * mapped.shape[0]
    return Block(mapped.indptr, mapped.indices, mapped.data, totals, species, {}, is_float32(lab.counts.dtype))


def _empty_block(block):
    """The same cells with no RNA counts (totals 1, so nothing divides by zero)."""
    from dataclasses import replace

    n = len(block.indptr) - 1
    return replace(
        block,
        indptr=np.zeros(n + 1, dtype=block.indptr.dtype),
        genes=block.genes[:0],
        counts=block.counts[:0],
        n_counts=np.ones(n),
    )


def _target_cells(features, paired: PairedCells, target: str):
    """The target modality's counts over the model's `features`, as `ModalityCells`."""
    model_features = np.asarray(features).astype(str)
    counts, where = paired.counts[target], f"{paired.files[target]} ({target})"
    if target == "adt":
        mapped = counts[:, _panel_columns(paired, model_features)]
    else:
        mapped = _peaks_on_model_bins(counts, paired.features[target], model_features, where)
    return _as_modality_cells(sp.csr_matrix(mapped))


MIN_SHARED_BINS = 0.5  # share of the data's bins (with counts) the model must have


def _peaks_on_model_bins(counts, peaks, model_bins: np.ndarray, where: str):
    """Peak counts summed into the model's bins (its bin size read from its bin names)."""

    from celltron.corpus.peaks import bin_counts, peak_bins
    from celltron.errors import InputError

    start, end = model_bins[0].rsplit(":", 1)[1].split("-")
    bins = peak_bins(peaks, int(end) - int(start), where)
    binned = bin_counts(sp.csr_matrix(counts), bins)
    position = {name: i for i, name in enumerate(model_bins)}
    columns = np.asarray([position.get(str(name), -1) for name in bins.bins])
    kept = columns >= 0
    weight = np.asarray(binned.sum(axis=0)).ravel()
    share = float(weight[kept].sum() / max(weight.sum(), 1))
    if share < MIN_SHARED_BINS:
        raise InputError(
            f"{where}: only {share:.0%} of the chromatin counts fall in bins the model has; pass peaks on the model's "
            "genome build (the bins of its pretraining corpus)"
        )
    moved = sp.csr_matrix((np.ones(kept.sum()), (np.flatnonzero(kept), columns[kept])), shape=(len(columns), len(model_bins)))
    return (binned @ moved).astype(counts.dtype)


def standardise_on(embedding: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Columns centred and scaled on the training cells (a ridge penalty then treats them alike)."""
    mean, spread = embedding[train].mean(0), embedding[train].std(0)
    return (embedding - mean) / np.where(spread > 0, spread, 1.0)


def protein_units(truth: np.ndarray, predicted: np.ndarray) -> UnitScore:
    """Per-protein Pearson of held-out cells, proteins the resampled units."""
    return UnitScore.of_units(per_protein_scores(truth, predicted)["pearson"])


def inner_folds(train: np.ndarray, folds: int, seed: int, seen=None, labels=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inner (fit, held-out) cells of the training cells `train`. Held-out cells are drawn only from
    training cells the model has not seen (`seen`: per cell, e.g. `crossmodal.train_only`, the
    cells it was pretrained on): a model pretrained on a cell's pair scores that cell too well, so
    an inner choice scored on it would favour the model. Every other training cell stays in the
    fit. Stratified by `labels` when given."""
    import warnings

    from sklearn.model_selection import StratifiedKFold

    candidates = train if seen is None else train[~seen[train]]
    if len(candidates) < folds:
        raise InputError(
            f"only {len(candidates)} training cells outside crossmodal.train_only, too few for {folds} inner folds; "
            "hold out fewer cells (--test-fraction) or name fewer cells in --train-only"
        )
    if labels is None:
        split = KFold(folds, shuffle=True, random_state=seed).split(candidates)
    else:
        with warnings.catch_warnings():  # a label with fewer cells than inner folds: sklearn warns, and copes
            warnings.simplefilter("ignore", UserWarning)
            split = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(candidates, labels[candidates]))
    return [(np.setdiff1d(train, candidates[held]), candidates[held]) for _, held in split]


def choose_anchor_weight(baseline, model, targets, train: np.ndarray, weights, folds: int, seed: int, seen=None) -> dict:
    """The anchored head's weight by inner CV over the training cells (`inner_folds`): per inner
    fold, the best baseline and the model head refitted on the inner training cells, the blends
    scored on the inner held-out cells (per-protein Pearson), `report.choose_weight` over them."""
    by_weight = {float(w): [] for w in weights}
    for fit, held in inner_folds(train, folds, seed, seen):
        base, plain = baseline(fit)[held], model(fit)[held]
        for w in by_weight:
            by_weight[w].append(protein_units(targets[held], anchor(base, plain, w)))
    return choose_weight(by_weight, seed=seed)


def dropout_predictions(embedding: np.ndarray, passes: np.ndarray, targets: np.ndarray, fit: np.ndarray, section, seed: int):
    """MC dropout of the model's ridge head: the ridge fitted as `model_predictor` fits it (on
    the dropout-off embedding of the `fit` cells, alpha by inner CV there), then applied to each
    pass's embedding (standardised as the dropout-off one). Returns (dropout-off predictions,
    (passes, cells, proteins) predictions) for every cell."""
    cells = len(embedding)
    stacked = np.concatenate([embedding, *passes])  # one ridge fit predicts every pass's rows
    features = standardise_on(stacked, fit)  # fit indexes the dropout-off rows: their statistics
    _, choice = bl.tuned("ridge", section.ridge_alphas, features[:cells], targets, fit, section.inner_folds, seed)
    padded = np.zeros((len(stacked), targets.shape[1]), dtype=targets.dtype)
    padded[:cells] = targets  # rows beyond the first block are predicted, never fitted
    predicted = bl.ridge_regression(choice["chosen"])(features, padded, fit).reshape(len(passes) + 1, cells, -1)
    return predicted[0], predicted[1:]


def model_predictor(embedding: np.ndarray, targets: np.ndarray, train: np.ndarray, section, seed: int):
    """Ridge from the standardised embedding, alpha by inner CV on `train`; returns a function of
    the cells it is fitted on -> predictions for every cell, and the alpha record."""
    features = standardise_on(embedding, train)
    predictor, choice = bl.tuned("ridge", section.ridge_alphas, features, targets, train, section.inner_folds, seed)
    return (lambda fit: predictor(features, targets, fit)), choice
