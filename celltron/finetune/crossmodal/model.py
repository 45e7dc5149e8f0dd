"""A pretrained model in the cross-modal tasks: its frozen cell embedding of each cell's RNA, and
the heads built on it.

Any model folder works: an RNA model, a joint multi-modal model (its tokenizer gives RNA-only
sequences, which it was also trained to read) or the RNA tower of a paired export. The cells are
tokenised by the model's own tokenizer after their genes are mapped to Ensembl IDs, and embedded
once in eval mode (no dropout): a function of each cell alone, so held-out cells' embeddings carry
nothing of their proteins or of other cells.

The prediction head is ridge regression from the standardised embedding to the CLR proteins
(alpha by inner CV on training cells, like the ridge baseline's). The anchored head predicts the
best baseline plus w x (model − best baseline), w chosen by `report.choose_weight` over inner folds
of the training cells, proteins as units (w = 0 is the baseline exactly).
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import KFold

from celltron.finetune.crossmodal import baselines as bl
from celltron.finetune.crossmodal.data import PairedCells
from celltron.finetune.crossmodal.evaluate import per_protein_scores
from celltron.finetune.report import UnitScore, anchor, choose_weight


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


def rna_embeddings(folder, paired: PairedCells, batch_size: int, seed: int, data_section=None) -> np.ndarray:
    """(cells, hidden) frozen cell embeddings of each cell's RNA by the model in `folder`."""
    from celltron.finetune.annotate import frozen_cell_embeddings
    from celltron.lab.data import check_vocabulary_coverage, load_model_tokenizer, tokenize_cells

    options = (
        {} if data_section is None else {"species": data_section.species, "min_mapped_fraction": data_section.min_mapped_fraction}
    )
    lab = rna_lab_data(paired, **options)
    tokenizer = load_model_tokenizer(folder, lab)
    check_vocabulary_coverage(lab, tokenizer.vocab)
    tokens = tokenize_cells(lab, tokenizer, seed=seed)
    return frozen_cell_embeddings(folder, tokens, tokenizer.vocab.special_id("pad"), batch_size)


def standardise_on(embedding: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Columns centred and scaled on the training cells (a ridge penalty then treats them alike)."""
    mean, spread = embedding[train].mean(0), embedding[train].std(0)
    return (embedding - mean) / np.where(spread > 0, spread, 1.0)


def protein_units(truth: np.ndarray, predicted: np.ndarray) -> UnitScore:
    """Per-protein Pearson of held-out cells, proteins the resampled units."""
    return UnitScore.of_units(per_protein_scores(truth, predicted)["pearson"])


def choose_anchor_weight(baseline, model, targets, train: np.ndarray, weights, folds: int, seed: int) -> dict:
    """The anchored head's weight by inner CV over the training cells: per inner fold, the best
    baseline and the model head refitted on the inner training cells, the blends scored on the
    inner held-out cells (per-protein Pearson), `report.choose_weight` over them."""
    by_weight = {float(w): [] for w in weights}
    for fit, held in KFold(folds, shuffle=True, random_state=seed).split(train):
        fit, held = train[fit], train[held]
        base, plain = baseline(fit)[held], model(fit)[held]
        for w in by_weight:
            by_weight[w].append(protein_units(targets[held], anchor(base, plain, w)))
    return choose_weight(by_weight, seed=seed)


def model_predictor(embedding: np.ndarray, targets: np.ndarray, train: np.ndarray, section, seed: int):
    """Ridge from the standardised embedding, alpha by inner CV on `train`; returns a function of
    the cells it is fitted on -> predictions for every cell, and the alpha record."""
    features = standardise_on(embedding, train)
    predictor, choice = bl.tuned("ridge", section.ridge_alphas, features, targets, train, section.inner_folds, seed)
    return (lambda fit: predictor(features, targets, fit)), choice
