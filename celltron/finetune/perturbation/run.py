"""Perturbation response, GEARS / scGPT style: from a control cell's tokens, with a flag on the
targeted genes (their token added when the cell does not express them), predict the
post-perturbation expression of every measured gene; works with all three families.

The head reads the flagged tokens' final hidden states (what the encoder makes of the
perturbed genes in this cell) and the cell embedding, and either mixes the training
perturbations' shifts by attention (retrieval) or scores each measured gene against its
pretrained gene embedding (bilinear); see PerturbationModel. An untrained head predicts the
training-mean baseline. Targets are pseudobulk means (the metrics score pseudobulk means); a
perturbation's prediction averages the predictions from many control cells.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from celltron.corpus.genes import ensembl_to_symbol
from celltron.corpus.store import Corpus, log_normalised_cells
from celltron.errors import ConfigError, InputError
from celltron.finetune.adapt import count_trainable, load_encoder
from celltron.finetune.perturbation import baselines, graph
from celltron.finetune.perturbation.evaluate import (
    METRICS,
    RESPONSIVE_FDR,
    TABLE_METRICS,
    evaluate_folds,
    heldout_split,
    higher_is_better,
    leave_one_out_folds,
    pseudobulk,
    simulation_split,
)
from celltron.finetune.perturbation.intervals import (
    BASELINE_CENTRE,
    BASELINE_METHOD,
    MODEL_CENTRE,
    PLAIN_MODEL_CENTRE,
    PerturbationUncertainty,
    baseline_inner_predictions,
    with_gene_scale,
)
from celltron.finetune.perturbation.model import (
    PerturbationModel,
    PerturbationPairs,
    PerturbationProbe,
    ViewPairs,
    collate_pairs,
    collate_views,
    frozen_views,
    predict_means,
    probe_means,
    target_tokens,
    training_pairs,
)
from celltron.finetune.report import (
    UnitScore,
    aggregate,
    anchor,
    choose_weight,
    paired_difference,
    plot_bars,
    results_table,
    save_figure,
    verdict,
    verdict_line,
    write_metrics,
)
from celltron.finetune.settings import (
    at_learning_rate,
    choose_setting,
    learning_rates,
    predictions_by_length,
    run_folder,
    training_lengths,
)
from celltron.io import write_h5ad_atomically, write_text_atomically
from celltron.lab.data import check_vocabulary_coverage, load_model_tokenizer, read_configured_lab_data, tokenize_cells
from celltron.model_zoo.registry import base_of, family_of, gene_token_table, resolve_model_folder
from celltron.preprocessing import FrequentDirections
from celltron.tokenizers.vocab import GeneVocab
from celltron.training.examples import train_task_model

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- inputs


def max_tokens_of(config) -> int | None:
    """Longest input the model takes (position embeddings), None where its family has no
    position limit (scGPT)."""
    return getattr(config, "max_position_embeddings", None) if family_of(config).has_position_limit else None


def specials_of(vocab) -> set:
    return {int(i) for i in vocab.special_ids()}


def model_folder_vocab(folder: Path):
    return GeneVocab.from_pretrained(folder)


# ---------------------------------------------------------------- the task


def make_folds(config, perturbations: list[str], seed: int) -> tuple[dict, list[dict]]:
    """The seed's split as metrics.json records it, and its folds (disjoint test sets, each with
    its training perturbations): one fold for heldout and simulation, one per perturbation for
    leave_one_out."""
    section = config.perturbation
    if section.split == "leave_one_out":
        folds = leave_one_out_folds(perturbations)
        return {"test": sorted(perturbations), "folds": folds}, folds
    choose = simulation_split if section.split == "simulation" else heldout_split
    split = choose(perturbations, section.test_fraction, seed)
    return split, [{"train": split["train"], "test": split["test"]}]


def _screen(lab, section):
    """Pseudobulk means and DE genes of the lab data, per perturbation."""
    import anndata as ad
    import pandas as pd

    view = ad.AnnData(
        X=lab.counts,
        obs=lab.obs[[section.perturbation_key]].astype(str),
        var=pd.DataFrame(index=pd.Index(lab.gene_names.astype(str)).astype(object)),
    )
    return pseudobulk(view, section.perturbation_key, section.control, section.de_genes, str(lab.path))


COEXPRESSION_COMPONENTS = 20
CORPUS_CELLS = 50_000  # cells of a corpus reference streamed into its co-expression sketch
SKETCH_ROWS_PER_COMPONENT = 10


def gene_embeddings(config, prepared, lab, screen) -> dict[str, dict[str, np.ndarray]]:
    """Embeddings of the target genes from outside the screen, one per source the run has: the
    co-expression reference (perturbation.coexpression_reference) and the model's gene tokens."""
    out = {}
    if config.perturbation.coexpression_reference:
        out["coexpression"] = coexpression_embedding(config.perturbation.coexpression_reference, lab.species)
    if prepared is not None:
        genes = sorted({g for p in screen.perturbations for g in screen.targets(p)})
        out["model"] = model_gene_embedding(prepared, genes, lab)
    return out


def coexpression_embedding(path, species: str, components: int = COEXPRESSION_COMPONENTS, seed: int = 0) -> dict:
    """{gene symbol and Ensembl id: its loadings on the top principal components of the
    reference's log-normalised expression (scaled by each component's spread)}: genes that vary
    together get nearby vectors. Genes without counts in the reference are left out. A folder
    is read as a celltron corpus (`corpus_coexpression_embedding`)."""
    if Path(path).is_dir():
        return corpus_coexpression_embedding(path, species, components)
    from celltron.lab.data import read_lab_data
    from celltron.preprocessing import fit_pca, log_normalise

    reference = read_lab_data(path, (), species=species)
    counted = np.flatnonzero(reference.gene_counts > 0)
    pca = fit_pca(log_normalise(reference.counts[:, counted]), components, seed)
    loadings = (pca.components_ * np.sqrt(pca.explained_variance_)[:, None]).T
    out = {}
    for row, column in enumerate(counted):
        for key in (str(reference.gene_names[column]), str(reference.gene_ids[column])):
            if key:
                out.setdefault(key, loadings[row])
    return out


def corpus_coexpression_embedding(
    location, species: str, components: int = COEXPRESSION_COMPONENTS, max_cells: int = CORPUS_CELLS
) -> dict:
    """`coexpression_embedding` of a corpus (e.g. the model's pretraining corpus): the first
    `max_cells` training cells streamed once into a Frequent Directions sketch, never held in
    memory; loadings scaled as PCA's, so the two kinds of reference give vectors on one scale.
    Keyed by Ensembl id and the species' symbol."""
    corpus = Corpus(str(location))
    # single-cell noise spreads energy over many directions: at 2 x components rows the top 5
    # genes' inner products matched exact PCA of the same 400 PBMCs at r = 0.66, at 10 x at 0.998
    sketch = FrequentDirections(corpus.n_genes, SKETCH_ROWS_PER_COMPONENT * components)
    for block in log_normalised_cells(corpus, "train", max_cells, block_cells=sketch.rows):
        sketch.update(block)
    values, right = sketch.components(components, centre=True)
    loadings = np.zeros((corpus.n_genes, components))
    loadings[:, : len(values)] = right.T * (values / np.sqrt(max(sketch.n_rows - 1, 1)))
    symbol_of = ensembl_to_symbol(species)
    out = {}
    for column in np.flatnonzero(sketch.column_counts > 0):
        gene = str(corpus.gene_ids[column])
        out[gene] = loadings[column]
        if symbol_of.get(gene):
            out.setdefault(symbol_of[gene], loadings[column])
    return out


@functools.lru_cache(maxsize=1)
def input_embedding_table(folder: Path) -> np.ndarray:
    """The pretrained model's gene-token table (tokens x hidden: `registry.gene_token_table`,
    GeneCompass's priors included), read once per folder."""
    import torch

    from celltron.finetune.config import AdaptSection

    with torch.no_grad():
        return gene_token_table(load_encoder(folder, AdaptSection())).detach().float().numpy()


def model_gene_embedding(prepared, genes: list[str], lab) -> dict[str, np.ndarray]:
    """{gene: the pretrained model's gene-token vector (`input_embedding_table`)} for the genes it has a token for."""
    table = input_embedding_table(prepared.folder)
    tokens = target_tokens(genes, prepared.tokenizer.vocab, lab.species, str(lab.path))
    return {gene: table[ids].sum(0) for gene, ids in tokens.items()}


def model_node_vectors(prepared, genes: list[str], lab) -> dict[str, np.ndarray]:
    """{gene: the pretrained model's gene-token vector (`input_embedding_table`)} for every gene of `genes`
    (symbols or Ensembl IDs) the vocabulary has a token for, mapped in one pass."""
    from celltron.corpus.genes import map_genes

    table = input_embedding_table(prepared.folder)
    ids = map_genes(genes, lab.species, str(lab.path)).ensembl_ids
    tokens = prepared.tokenizer.vocab.lookup_genes([i or "" for i in ids])
    return {gene: table[t] for gene, i, t in zip(genes, ids, tokens) if i and t >= 0}


class GraphInputs:
    """The gene graph, its node features and the head's settings: built once per run from the
    screen (measured genes, every target, the control cells), perturbation.graph_grn and the
    co-expression reference, and shared by every seed and fold."""

    def __init__(self, config, prepared, lab, screen, usable: list[str]):
        from celltron.inputs import read_truth
        from celltron.preprocessing import log_normalise

        section = config.perturbation
        grn = read_truth(section.graph_grn, "--graph-grn") if section.graph_grn else None
        control = np.flatnonzero(lab.obs[section.perturbation_key].astype(str).to_numpy() == section.control)
        if len(control) > GRAPH_CONTROL_CELLS:  # a seeded sample bounds the dense copy
            control = np.sort(np.random.default_rng(config.trainer.seed).choice(control, GRAPH_CONTROL_CELLS, replace=False))
        expression = log_normalise(lab.counts[control]).toarray()
        targets = sorted({g for p in usable for g in screen.targets(p)})
        reference = screen.gene_embeddings.get("coexpression")
        self.graph = graph.build_gene_graph(
            [str(g) for g in screen.genes], targets, grn, expression, reference, section.graph_neighbours
        )
        vectors = {"learned": None, "coexpression": reference}.get(section.graph_features)
        if section.graph_features == "model":
            vectors = model_node_vectors(prepared, self.graph.nodes, lab)
        self.features = graph.node_features(self.graph, vectors)
        self.control = section.graph_control
        self.members = section.ensemble_members if section.intervals == "ensemble" else 1
        self.passes = section.dropout_passes if section.intervals == "mc_dropout" else 0
        self.settings = graph.GraphSettings(
            section.graph_dims,
            section.graph_layers,
            section.graph_steps,
            section.graph_lr,
            de_weight=section.de_weight,
            dropout=MC_DROPOUT if self.passes else 0.0,
        )
        self.isolated_targets = [g for g in targets if self.graph.degree(g) == 0]
        log.info("gene graph: %s; targets with no edge: %s", self.graph.summary(), self.isolated_targets)

    def for_seed(self, seed: int) -> graph.GeneGraph:
        """The graph a seed's head trains on: the graph itself, or under graph_control permuted
        its gene labels shuffled by the seed."""
        return self.graph.permuted(seed) if self.control == "permuted" else self.graph

    def predict(self, screen, fold: dict, seed: int) -> graph.GraphPrediction:
        return graph.graph_predictions(
            screen,
            self.for_seed(seed),
            fold["train"],
            fold["test"],
            self.settings,
            seed,
            self.features,
            self.members,
            self.passes,
        )

    def inner_predictions(self, screen, train: list[str], seed: int, n_folds: int) -> list[tuple[dict, graph.GraphPrediction]]:
        """The head on inner folds over the training perturbations `train` alone (the anchored
        weight and the intervals' scale are chosen on these): [(inner fold, its prediction)]."""
        folds = baselines.usable_inner_folds(train, n_folds, seed)
        return [(fold, self.predict(screen, fold, seed)) for fold in folds]

    def describe(self) -> dict:
        return {
            **self.graph.summary(),
            "targets_without_edges": self.isolated_targets,
            "features": "learned" if self.features is None else f"{self.features.shape[1]} fixed dims + learned",
            "control": self.control,
            "settings": vars(self.settings),
            "ensemble_members": self.members if self.members > 1 else None,
            "dropout_passes": self.passes or None,
        }


class _Prepared:
    """Everything of one model and one lab dataset that every seed's run shares."""

    def __init__(self, config, folder: Path, lab, screen):
        section = config.perturbation
        self.folder = folder
        self.tokenizer = load_model_tokenizer(folder, lab)
        vocab = self.tokenizer.vocab
        check_vocabulary_coverage(lab, vocab)
        labels = lab.obs[section.perturbation_key].astype(str).to_numpy()
        self.labels = labels
        self.control_rows = np.flatnonzero(labels == section.control)
        self.control_tokens = tokenize_cells(lab, self.tokenizer, self.control_rows, seed=config.trainer.seed)
        self.gene_tokens = vocab.lookup_genes(lab.gene_ids)
        self.targets = target_tokens(screen.perturbations, vocab, lab.species, str(lab.path))
        self.specials, self.pad_id = specials_of(vocab), vocab.special_id("pad")
        self.views = None
        if section.encoder == "frozen":
            self._compute_views(config)

    def _compute_views(self, config) -> None:
        """perturbation.encoder frozen: the pretrained encoder's view of every pair of a seeded
        pool of eval_cells control cells x usable perturbation, once (every seed, fold and inner
        fold reads them), and the gene-token table the head's keys read."""
        import torch

        from celltron.lab.inference import pick_device
        from celltron.model_zoo.registry import load_pretrained

        encoder = load_pretrained(self.folder).to(pick_device("auto"))
        n = min(config.perturbation.eval_cells, len(self.control_rows))
        self.pool = np.sort(np.random.default_rng(config.trainer.seed).choice(len(self.control_rows), n, replace=False))
        self.view_names = sorted(self.targets)
        targets = [self.targets[p] for p in self.view_names]
        max_tokens = max_tokens_of(base_of(encoder).config)
        batch = config.data.batch_size
        self.views = frozen_views(encoder, self.control_tokens, self.pool, targets, self.specials, max_tokens, self.pad_id, batch)
        self.table = torch.from_numpy(input_embedding_table(self.folder))  # cached: linear_model reads it too
        log.info("frozen encoder: %d control cells x %d perturbations embedded once", n, len(targets))

    def columns(self, perturbations: list[str]) -> list[int]:
        """Each perturbation's index in the frozen views."""
        return [self.view_names.index(p) for p in perturbations]


def _fine_tune(config, prepared: _Prepared, screen, split: dict, seed: int, out: Path, resume: str | None, callbacks=None):
    """Train one seed's model on split["train"]; returns it and whether this process is the first
    (every process gets the same model, so choices made with it agree)."""
    import lightning.pytorch as pl

    section = config.perturbation
    train = [p for p in split["train"] if p in prepared.targets]
    pl.seed_everything(config.trainer.seed + seed, workers=True, verbose=False)
    shifts = np.stack([screen.means[p] - screen.control_mean for p in train])
    head = (prepared.gene_tokens, screen.control_mean, shifts, [prepared.targets[p] for p in train])
    means = np.stack([screen.means[p] for p in train]).astype(np.float32)
    de_masks = np.zeros(means.shape, dtype=bool)
    for row, p in enumerate(train):
        de_masks[row, screen.de_genes[p]] = True
    if prepared.views is not None:  # frozen encoder: the head alone, on the cached views
        model = PerturbationProbe(prepared.table, *head, section.head_type, section.de_weight)
        pairs = training_pairs(prepared.labels, train, len(prepared.pool), seed)
        dataset = ViewPairs(prepared.views, pairs, np.asarray(prepared.columns(train)), means, de_masks)
        return train_task_model(config, model, dataset, collate_views, out, seed, resume, callbacks)
    model = PerturbationModel(load_encoder(prepared.folder, config.model), *head, section.head_type, section.de_weight)
    trainable, total = count_trainable(model)
    log.info("fine-tuning %d of %d parameters", trainable, total)
    pairs = training_pairs(prepared.labels, train, len(prepared.control_rows), seed)
    dataset = PerturbationPairs(
        prepared.control_tokens,
        pairs,
        [prepared.targets[p] for p in train],
        means,
        de_masks,
        prepared.specials,
        max_tokens_of(model.config),
    )
    pad_id = prepared.pad_id
    return train_task_model(config, model, dataset, lambda e: collate_pairs(e, pad_id), out, seed, resume, callbacks)


def _predictions(
    config, prepared: _Prepared, screen, fold: dict, seed: int, out: Path, resume, lr: float, lengths
) -> tuple[dict[int, dict[str, np.ndarray]], bool]:
    """Train on fold["train"] at learning rate `lr` and predict fold["test"] as training passes
    each of `lengths` (one run): ({steps: {perturbation: prediction}}, whether this process is
    the first)."""
    at_lr = at_learning_rate(config, lr)
    return predictions_by_length(
        lambda callbacks: _fine_tune(at_lr, prepared, screen, fold, seed, out, resume, callbacks),
        lambda model: _model_predictions(config, prepared, model, fold["test"], seed),
        config.trainer.max_steps,
        lengths,
        out,
    )


def _model_predictions(config, prepared: _Prepared, model, test: list[str], seed: int) -> dict[str, np.ndarray]:
    if prepared.views is not None:  # frozen encoder: averaged over the views' cells
        return dict(zip(test, probe_means(model, prepared.views, prepared.columns(test))))
    rng = np.random.default_rng(seed)
    n = min(config.perturbation.eval_cells, len(prepared.control_rows))
    cells = np.sort(rng.choice(len(prepared.control_rows), n, replace=False))
    predicted = predict_means(
        model,
        prepared.control_tokens,
        cells,
        [prepared.targets[p] for p in test],
        prepared.specials,
        max_tokens_of(model.config),
        prepared.pad_id,
        config.data.batch_size,
    )
    return dict(zip(test, predicted))


def _write_config(config, out: Path) -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    out.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        import yaml

        write_text_atomically(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))


def run_perturbation(config, model: str | None, out, baselines_only: bool = False, resume: str | None = None) -> dict | None:
    """The perturbation task end to end: folds per seed, baselines (the best chosen per fold by
    inner cross-validation over its training perturbations), fine-tuning and evaluation, then
    metrics.json, predictions.h5ad, a printed table, the model-against-best-baseline line and
    plots under `out`. Returns the metrics (None on processes other than the first)."""
    out = Path(out)
    section = config.perturbation
    if not config.data.path:
        raise ConfigError("no lab data: pass --data LAB.h5ad (or set data.path in the config)")
    if model is None and not baselines_only:
        raise ConfigError("no model: pass --model DIR_OR_HUB_ID, or --baselines-only for the baselines alone")
    if resume not in (None, "auto") and (section.split == "leave_one_out" or section.head == "anchored"):
        raise ConfigError(
            f"--resume {resume}: this run trains several models (leave_one_out folds, the anchored head's inner folds); "
            "resume them all with --resume auto"
        )
    lab = read_configured_lab_data(config.data, [section.perturbation_key])
    screen = _screen(lab, section)
    prepared = None if baselines_only else _Prepared(config, resolve_model_folder(model), lab, screen)
    usable = sorted(prepared.targets) if prepared else screen.perturbations
    excluded = sorted(set(screen.perturbations) - set(usable))
    if len(usable) < 3:
        raise InputError(
            f"{lab.path}: {len(usable)} usable perturbation(s) in obs[{section.perturbation_key!r}]; "
            "a split needs at least 3 besides the control"
        )
    screen.gene_embeddings = gene_embeddings(config, prepared, lab, screen)
    if section.graph_head and section.graph_features == "model" and prepared is None:
        raise ConfigError("perturbation.graph_features model reads the model's gene tokens: pass --model (or use learned)")
    graph_inputs = GraphInputs(config, prepared, lab, screen, usable) if section.graph_head else None
    # declared from the data alone, before any model runs
    responsive = [p for p in screen.responsive(section.responsive_min_de) if p in usable]
    _write_config(config, out)  # only now: a run refused for its inputs leaves no --out behind

    uncertainty = baseline_uncertainty = model_uncertainty = None
    if section.intervals != "none":
        baseline_uncertainty = PerturbationUncertainty(section, screen, None, BASELINE_METHOD, BASELINE_CENTRE)
        if graph_inputs is not None:
            uncertainty = PerturbationUncertainty(section, screen, graph_inputs.for_seed)
        if prepared is not None:
            centre = MODEL_CENTRE if section.head == "anchored" else PLAIN_MODEL_CENTRE
            model_uncertainty = PerturbationUncertainty(section, screen, None, BASELINE_METHOD, centre)
    runs = _Runs(graph_inputs, uncertainty, baseline_uncertainty, model_uncertainty)
    # every process trains every seed and fold (they train together); only the first reports
    first = [runs.add_seed(config, prepared, screen, usable, seed, out, resume) for seed in section.seeds]
    if not all(first):
        return None
    metrics = {
        "task": "perturbation",
        "data": str(lab.path),
        "model_folder": str(prepared.folder) if prepared else None,
        "model": runs.aggregate("model"),
        "head": section.head,
        "encoder": section.encoder if prepared else None,
        "model_plain": runs.aggregate(PLAIN) if section.head == "anchored" else None,
        "graph_head": runs.aggregate(GRAPH),
        "graph_head_plain": runs.aggregate(GRAPH_PLAIN),
        "graph": graph_inputs.describe() if graph_inputs else None,
        "graph_uncertainty": uncertainty.summary() if uncertainty else None,
        "baseline_uncertainty": baseline_uncertainty.summary() if baseline_uncertainty else None,
        "model_uncertainty": model_uncertainty.summary() if model_uncertainty and model_uncertainty.records else None,
        "baselines": {name: runs.aggregate(name) for name in baselines.baseline_names(screen)},
        "best_baseline": {
            "metric": section.headline,
            "chosen_by": f"inner {section.inner_folds}-fold cross-validation over each fold's training perturbations",
            "chosen_per_seed": {str(s): c for s, c in runs.chosen.items()},
            **runs.aggregate(BEST),
        },
        "split": {
            "kind": section.split,
            "test_fraction": section.test_fraction if section.split != "leave_one_out" else None,
            "per_seed": {str(s): v for s, v in runs.splits.items()},
        },
        "seeds": list(section.seeds),
        "excluded_perturbations": excluded,
        "responsive": {
            "min_de_genes": section.responsive_min_de,
            "fdr": RESPONSIVE_FDR,
            "perturbations": responsive,
            "n_significant": {p: screen.n_significant[p] for p in usable},
        },
        "notes": {
            "linear": "perturbations whose targets are not measured genes have no expression-derived embedding; "
            "the linear baseline predicts the training mean for them (fell_back_to_train_mean); linear_model and "
            "linear_coexpression embed targets by the model's gene tokens / co-expression in a reference instead",
            "notarget": "*_notarget metrics leave the perturbed genes out of the DE set (the next DE genes "
            "take their place) and out of every correlation and error",
        },
    }
    for name, per_seed in runs.fell_back.items():
        target = metrics["graph_head"] if name == GRAPH else metrics["baselines"][name]
        target["fell_back_to_train_mean"] = per_seed
    groups = _group_metrics(screen, runs, responsive)
    if groups:
        metrics["groups"] = groups
    if runs.model:
        metrics["paired"] = _paired(runs, section.headline, responsive)
    if GRAPH in runs.evaluations:
        metrics["paired_graph"] = _paired(runs, section.headline, responsive, GRAPH)
    intervals = {"graph": uncertainty, BEST: baseline_uncertainty, "model": model_uncertainty}
    return write_results(out, metrics, screen, runs.splits, runs.predictions, intervals)


BEST = "best_baseline"
PLAIN = "model_plain"  # the anchored head's model part alone
GRAPH = "graph"  # the gene-graph head (perturbation.graph_head), anchored as the model's head is
GRAPH_PLAIN = "graph_plain"  # the gene-graph head alone
MC_DROPOUT = 0.1  # the graph head's dropout when its intervals come from MC dropout
GRAPH_CONTROL_CELLS = 5000  # control cells whose co-expression gives the gene graph's edges
SIMULATION_GROUPS = ("unseen_single", "combo_seen0", "combo_seen1", "combo_seen2")


class _Runs:
    """Every seed's folds, predictions and evaluations, gathered for metrics.json."""

    def __init__(
        self, graph_inputs: GraphInputs | None = None, uncertainty=None, baseline_uncertainty=None, model_uncertainty=None
    ):
        self.graph_inputs, self.uncertainty = graph_inputs, uncertainty
        self.baseline_uncertainty, self.model_uncertainty = baseline_uncertainty, model_uncertainty
        self.splits, self.folds, self.chosen, self.predictions, self.fell_back = {}, {}, {}, {}, {}
        self.evaluations: dict[str, dict] = {}

    @property
    def model(self) -> bool:
        return bool(self.evaluations.get("model"))

    def add_seed(self, config, prepared, screen, usable, seed, out: Path, resume) -> bool:
        """Run one seed's folds; False on processes other than the first (they write nothing)."""
        section = config.perturbation
        split, folds = make_folds(config, usable, seed)
        names = baselines.baseline_names(screen)
        predicted = {name: {} for name in (*names, BEST)}
        chosen, first = [], True
        for k, fold in enumerate(folds):
            best, scores = baselines.choose_baseline(screen, fold["train"], section.headline, seed, section.inner_folds)
            chosen.append({"baseline": best, "inner_scores": scores, "test": fold["test"]})
            for name in names:
                values, fell = baselines.predict(name, screen, fold["train"], fold["test"])
                predicted[name].update(values)
                if name.startswith("linear"):
                    self.fell_back.setdefault(name, {}).setdefault(str(seed), []).extend(fell)
            predicted[BEST].update({p: predicted[best][p] for p in fold["test"]})
            if self.baseline_uncertainty is not None:  # calibrated on inner folds over the training perturbations
                calibration_folds = baselines.usable_inner_folds(fold["train"], section.inner_folds, seed)
                inner = baseline_inner_predictions(section, screen, calibration_folds, seed)
                outer = with_gene_scale(screen, {p: predicted[best][p] for p in fold["test"]}, fold["train"])
                self.baseline_uncertainty.add_fold(seed, fold, outer, inner)
            if self.graph_inputs is not None:
                outer = self.graph_inputs.predict(screen, fold, seed)
                values = outer.mean
                self.fell_back.setdefault(GRAPH, {}).setdefault(str(seed), []).extend(outer.fell_back)
                needs_inner = section.head == "anchored" or self.uncertainty is not None
                inner = (
                    self.graph_inputs.inner_predictions(screen, fold["train"], seed, section.inner_folds) if needs_inner else []
                )
                if self.uncertainty is not None:
                    self.uncertainty.add_fold(seed, fold, outer, inner)
                if section.head == "anchored":
                    choice = choose_graph_weight(section, screen, inner, seed)
                    chosen[-1].update({"graph_weight": choice["weight"], "graph_weight_scores": choice.get("weight_scores")})
                    predicted.setdefault(GRAPH_PLAIN, {}).update(values)
                    values = {p: anchor(predicted[best][p], values[p], choice["weight"]) for p in fold["test"]}
                predicted.setdefault(GRAPH, {}).update(values)
            if prepared is None:
                continue
            where = out / f"seed{seed}" / (f"fold{k}" if len(folds) > 1 else "")
            choice = {"learning_rate": config.optim.lr, "steps": config.trainer.max_steps, "weight": 1.0}
            inner = []
            if section.head == "anchored":
                choice = choose_settings(config, prepared, screen, fold["train"], seed, where, resume, inner)
                chosen[-1].update(choice)
            elif self.model_uncertainty is not None:  # no folds chose anything: its intervals need their own
                inner = plain_calibration_folds(config, prepared, screen, fold["train"], seed, where, resume, choice)
            by_length, first_process = _predictions(
                config, prepared, screen, fold, seed, where, resume, choice["learning_rate"], (choice["steps"],)
            )
            if not first_process:
                first = False
                continue
            plain = by_length[choice["steps"]]
            if section.head == "anchored":
                predicted.setdefault(PLAIN, {}).update(plain)
                plain = {p: anchor(predicted[best][p], plain[p], choice["weight"]) for p in fold["test"]}
            predicted.setdefault("model", {}).update(plain)
            if self.model_uncertainty is not None and inner:
                calibration = [(f, with_gene_scale(screen, values, f["train"])) for f, values in inner]
                self.model_uncertainty.add_fold(seed, fold, with_gene_scale(screen, plain, fold["train"]), calibration)
        self.splits[seed], self.folds[seed], self.chosen[seed] = split, folds, chosen
        self.predictions[seed] = predicted
        for name, values in predicted.items():
            self.evaluations.setdefault(name, {})[seed] = evaluate_folds(values, screen, folds)
        return first

    def aggregate(self, name: str) -> dict | None:
        runs = self.evaluations.get(name)
        return aggregate(runs, METRICS, "per_perturbation") if runs else None


def choose_settings(config, prepared, screen, train: list[str], seed: int, where: Path, resume, inner=None) -> dict:
    """The anchored head's learning rate, training length and residual weight, by inner cross-
    validation over the training perturbations `train`: in each inner fold a baseline is chosen
    and one model per learning rate trained on the inner training perturbations alone (its
    predictions taken after every length). The setting is the one whose model alone scores best
    on the headline over the inner held-out perturbations (ties: the first learning rate listed,
    the shorter length); the weight, by `report.earned_weight` on the blends at that setting:
    the smallest (the baseline's side) unless a larger one gains beyond the interval over
    resampled inner held-out perturbations. Every process computes the same choice.

    Returns:
        {"learning_rate", "steps", "setting_scores", "weight", "weight_scores", "gain_low"}; with too few
        training perturbations to cross-validate, optim.lr, the full length and the smallest
        weight, and no scores. `inner` (a list) receives each inner fold with the chosen blend's
        predictions of its held-out perturbations (the model head's interval calibration).
    """
    section = config.perturbation
    folds = baselines.usable_inner_folds(train, section.inner_folds, seed)
    rates, lengths = learning_rates(section, config.optim), training_lengths(section, config.trainer.max_steps)
    if not folds:  # too few training perturbations to cross-validate: stay on the baseline's side
        weight = float(min(section.anchor_weights))
        return {"learning_rate": rates[0], "steps": config.trainer.max_steps, "weight": weight, "weight_scores": {}}
    baseline = _inner_baselines(section, screen, folds, seed)
    model = {(lr, steps): {} for lr in rates for steps in lengths}
    for j, fold in enumerate(folds):
        for lr in rates:
            folder = run_folder(where / f"inner{j}", lr, rates)
            by_length, _ = _predictions(config, prepared, screen, fold, seed, folder, resume, lr, lengths)
            for steps, predictions in by_length.items():
                model[lr, steps].update(predictions)
    better = higher_is_better(section.headline)
    alone = {key: evaluate_folds(predictions, screen, folds)[section.headline] for key, predictions in model.items()}
    lr, steps, setting_scores = choose_setting(alone, better)
    weight = _blend_weight(section, screen, folds, baseline, model[lr, steps], seed)
    if inner is not None:
        chosen = {p: anchor(baseline[p], model[lr, steps][p], weight["weight"]) for p in baseline}
        inner.extend((fold, {p: chosen[p] for p in fold["test"]}) for fold in folds)
    return {"learning_rate": lr, "steps": steps, "setting_scores": setting_scores} | weight


def plain_calibration_folds(config, prepared, screen, train: list[str], seed: int, where: Path, resume, choice: dict) -> list:
    """A plain head's inner folds, fitted only to calibrate its intervals (CV+ style): the folds
    `choose_settings` would use over the training perturbations `train`, one model per fold at
    the head's own learning rate and length, with its predictions of the fold's held-out
    perturbations (entries as `choose_settings` fills `inner`). Too few training perturbations
    to cross-validate: none, and no interval."""
    folds = baselines.usable_inner_folds(train, config.perturbation.inner_folds, seed)
    rate, steps = choice["learning_rate"], choice["steps"]
    inner = []
    for j, fold in enumerate(folds):
        by_length, _ = _predictions(config, prepared, screen, fold, seed, where / f"inner{j}", resume, rate, (steps,))
        inner.append((fold, by_length[steps]))
    return inner


def _inner_baselines(section, screen, folds: list[dict], seed: int) -> dict[str, np.ndarray]:
    """Each inner fold's held-out perturbations predicted by the baseline chosen on that fold's
    training perturbations alone (`baseline_inner_predictions`, merged)."""
    return {
        p: v for _, prediction in baseline_inner_predictions(section, screen, folds, seed) for p, v in prediction.mean.items()
    }


def _blend_weight(section, screen, folds: list[dict], baseline: dict, head: dict, seed: int) -> dict:
    """The anchored weight (report.choose_weight) of baseline + w x (head − baseline) over the
    inner folds' held-out perturbations."""
    by_weight = {}
    for w in sorted(set(section.anchor_weights)):
        per = evaluate_folds({p: anchor(baseline[p], head[p], w) for p in head}, screen, folds)["per_perturbation"]
        by_weight[w] = [UnitScore.of_units([values[section.headline] for values in per.values()])]
    return choose_weight(by_weight, higher_is_better(section.headline), seed=seed)


def choose_graph_weight(section, screen, inner: list[tuple[dict, graph.GraphPrediction]], seed: int) -> dict:
    """The gene-graph head's residual weight over the best baseline, by the anchored model head's
    rule (report.choose_weight) on `inner` (GraphInputs.inner_predictions: folds over the
    training perturbations alone, each with the head trained on its inner training
    perturbations): in each inner fold a baseline is chosen; the smallest weight unless a larger
    one gains beyond the interval. Too few training perturbations to cross-validate: the
    smallest weight."""
    if not inner:
        return {"weight": float(min(section.anchor_weights)), "weight_scores": {}}
    folds = [fold for fold, _ in inner]
    head = {p: v for _, prediction in inner for p, v in prediction.mean.items()}
    return _blend_weight(section, screen, folds, _inner_baselines(section, screen, folds, seed), head, seed)


def _group_metrics(screen, runs: _Runs, responsive: list[str]) -> dict:
    """Each predictor's metrics per group over seeds: simulation's unseen_single and
    combo_seen0/1/2, and the responsive held-out perturbations."""
    groups = {}
    for seed, split in runs.splits.items():
        members = {g: split[g] for g in SIMULATION_GROUPS if split.get(g)}
        members["responsive"] = [p for p in split["test"] if p in responsive]
        for group, perturbations in members.items():
            for name, values in runs.predictions[seed].items():
                if perturbations:
                    result = evaluate_folds(values, screen, runs.folds[seed], only=perturbations)
                    groups.setdefault(group, {}).setdefault(name, {})[seed] = result
    return {
        group: {name: aggregate(per_seed, METRICS, "per_perturbation") for name, per_seed in by_name.items()}
        for group, by_name in groups.items()
    }


def _paired(runs: _Runs, metric: str, responsive: list[str], predictor: str = "model") -> dict:
    """`predictor` (the model, or the graph head) − best baseline on `metric` per held-out
    perturbation (each averaged over seeds), with a 95% interval over perturbations; also over
    the responsive ones."""
    model, best = (
        per_unit_means((e["per_perturbation"] for e in runs.evaluations[name].values()), metric) for name in (predictor, BEST)
    )
    out = {"metric": metric}
    for name, units in (("all", model), ("responsive", {p: v for p, v in model.items() if p in responsive})):
        difference = paired_difference(units, best, higher_is_better(metric))
        out[name] = {**difference, "verdict": verdict(difference)}
    return out


def per_unit_means(per_seed, metric: str) -> dict[str, float]:
    """perturbation -> its `metric` averaged over the seeds that held it out, from each seed's
    {perturbation: metrics} (metrics.json's `per_perturbation` values)."""
    values: dict[str, list[float]] = {}
    for per_perturbation in per_seed:
        for p, result in per_perturbation.items():
            values.setdefault(p, []).append(result[metric])
    return {p: float(np.mean(v)) for p, v in values.items()}


def write_results(out: Path, metrics: dict, screen, splits: dict, predictions: dict, intervals: dict | None = None) -> dict:
    """metrics.json, predictions.h5ad (one row per seed and held-out perturbation: the model's
    prediction in X, truth, control and each baseline as layers, with the intervals), the table,
    the line saying whether the model beat the best baseline, and the plots. `intervals`:
    {prediction name: its PerturbationUncertainty or None}."""
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out / "metrics.json", metrics)
    intervals = {name: who for name, who in (intervals or {}).items() if who is not None and who.records}
    _write_predictions(out / "predictions.h5ad", screen, splits, predictions, intervals)
    for name, who in intervals.items():
        who.plot(out / f"{name}_ood_error.png")
    headline = metrics["best_baseline"]["metric"]
    plain = {"model, plain head": metrics["model_plain"]} if metrics.get("model_plain") else {}
    if metrics.get("graph_head"):
        anchored = metrics.get("graph_head_plain") is not None
        plain["gene-graph head" + (", anchored" if anchored else "")] = metrics["graph_head"]
        if anchored:
            plain["gene-graph head, plain"] = metrics["graph_head_plain"]
    shown = {**metrics, "baselines": {**plain, **metrics["baselines"], "best (inner CV)": metrics["best_baseline"]}}
    plot_bars(shown, headline, out / f"{headline}.png", f"{headline} (held-out perturbations)")
    if metrics.get("model"):
        _plot_delta_scatter(out / "delta_scatter.png", screen, splits, predictions)
    print(results_table(shown, TABLE_METRICS, {"linear": "falls back to the training mean where no target is a measured gene"}))
    print(_chosen_line(metrics["best_baseline"]))
    for key, who in (("paired", "model"), ("paired_graph", "gene-graph head")):
        for subset, difference in (metrics.get(key) or {}).items():
            if subset != "metric" and difference["n_units"]:
                unit = (
                    "perturbations"
                    if subset == "all"
                    else f"responsive perturbations (>= {metrics['responsive']['min_de_genes']} DE genes)"
                )
                print(verdict_line(headline, "best baseline", difference, unit).replace("model", who, 1))
    for key, who in (
        ("baseline_uncertainty", "best baseline"),
        ("model_uncertainty", "model head"),
        ("graph_uncertainty", "gene-graph head"),
    ):
        if metrics.get(key):
            print(_uncertainty_line(metrics[key], who))
    return metrics


def _uncertainty_line(summary: dict, who: str) -> str:
    """Coverage of a predictor's intervals, and whether error rises with the OOD score."""
    ood = summary["ood"]
    line = (
        f"{who}, {summary['level']:g} intervals ({summary['method']}, calibrated on training perturbations): "
        f"coverage {summary['coverage']:.3f} over all genes, {summary['coverage_de_notarget']:.3f} over DE genes, "
        f"{summary['coverage_gaussian']:.3f} uncalibrated, on {summary['n_with_interval']} of {summary['n_units']} held-out "
        "perturbations"
    )
    if summary.get("strata", "none") != "none":
        line += f" ({summary['coverage_predicted_change']:.3f} over the genes each prediction moves most: a scale of their own)"
    if ood["space"] is None:
        return line + "; no OOD score (no co-expression reference, model or graph to measure in)"
    return (
        f"{line}; OOD ({ood['space']} space): {ood['n_flagged']} flagged, AUROC of large error "
        f"{ood['auroc_large_error']:.2f}, Spearman {ood['spearman']:.2f} over {ood['n_units']}"
    )


def _chosen_line(best: dict) -> str:
    """Which baseline (and anchored weight) the inner cross-validations chose, how often (over
    seeds and folds)."""
    chosen = [c for per_seed in best["chosen_per_seed"].values() for c in per_seed]
    line = f"best baseline on {best['metric']}, chosen by {best['chosen_by']}: {_counts([c['baseline'] for c in chosen])}"
    if all("weight" in c for c in chosen):
        line += f"; anchored head's residual weight (inner CV): {_counts([c['weight'] for c in chosen])}"
        if any(c.get("setting_scores") and len(c["setting_scores"]) > 1 for c in chosen):
            settings = _counts([f"lr {c['learning_rate']:g}, {c['steps']} steps" for c in chosen])
            line += f"; learning rate and length (inner CV): {settings}"
    if any("graph_weight" in c for c in chosen):
        line += f"; gene-graph head's residual weight (inner CV): {_counts([c['graph_weight'] for c in chosen])}"
    return line


def _counts(values: list) -> str:
    return ", ".join(f"{v} x{values.count(v)}" for v in sorted(set(values), key=values.index))


def _write_predictions(path: Path, screen, splits: dict, predictions: dict, intervals: dict) -> None:
    """`intervals`: {prediction name: its PerturbationUncertainty or None}; each gives layers
    NAME_interval_low / _high, and the first with an OOD space the obs ood_* columns."""
    import anndata as ad
    import pandas as pd

    rows, obs = [], []
    for seed, split in splits.items():
        for p in split["test"]:
            group = next((g for g in SIMULATION_GROUPS if p in split.get(g, [])), "test")
            rows.append(p)
            obs.append({"perturbation": p, "seed": int(seed), "group": group})
    layers = {"truth": np.stack([screen.means[p] for p in rows]), "control_mean": np.tile(screen.control_mean, (len(rows), 1))}
    extra = tuple(name for name in (GRAPH, GRAPH_PLAIN) if all(name in predictions[s] for s in splits))
    for name in (*baselines.baseline_names(screen), BEST, *extra):
        layers[name] = np.stack([predictions[o["seed"]][name][o["perturbation"]] for o in obs])
    missing = (np.full(len(screen.genes), np.nan),) * 2
    scored = False
    for name, uncertainty in intervals.items():
        bounds = [uncertainty.bounds.get(o["seed"], {}).get(o["perturbation"], missing) for o in obs]
        layers[f"{name}_interval_low"] = np.stack([b[0] for b in bounds])
        layers[f"{name}_interval_high"] = np.stack([b[1] for b in bounds])
        if not scored and uncertainty.scored_space is not None:
            scored = True
            unscored = {"ood_distance": np.nan, "ood_score": np.nan, "ood_flagged": False}
            for o in obs:
                record = uncertainty.records.get(o["seed"], {}).get(o["perturbation"], unscored)
                o.update({key: record[key] for key in unscored})
    has_model = all("model" in predictions[s] for s in splits)
    X = np.stack([predictions[o["seed"]]["model"][o["perturbation"]] for o in obs]) if has_model else layers["truth"]
    adata = ad.AnnData(
        X=X.astype(np.float32),
        obs=pd.DataFrame(obs, index=[f"{o['seed']}:{o['perturbation']}" for o in obs]),
        var=pd.DataFrame(index=pd.Index(screen.genes.astype(str))),
        layers={k: v.astype(np.float32) for k, v in layers.items()},
    )
    adata.uns["X"] = "model prediction" if has_model else "truth (baselines only)"
    write_h5ad_atomically(adata, path)


def _plot_delta_scatter(png: Path, screen, splits: dict, predictions: dict) -> None:
    """Predicted against true change from control over each held-out perturbation's DE genes (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = next(iter(splits))
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    for p in splits[seed]["test"]:
        de = screen.de_genes[p]
        axes.scatter(
            screen.means[p][de] - screen.control_mean[de],
            predictions[seed]["model"][p][de] - screen.control_mean[de],
            s=10,
            label=p,
        )
    axes.axhline(0, color="#999", lw=0.5)
    axes.axvline(0, color="#999", lw=0.5)
    axes.set_xlabel("true change from control (DE genes)")
    axes.set_ylabel("predicted change")
    axes.set_title(f"held-out perturbations, seed {seed}")
    if len(splits[seed]["test"]) <= 10:
        axes.legend(fontsize=6)
    figure.tight_layout()
    save_figure(figure, png)
