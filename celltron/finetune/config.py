"""A fine-tuning run, fully described: how the pretrained model is adapted, the lab data, the
task's options, and the optimiser, trainer and logging sections shared with pretraining.
YAML spells them out (configs/finetune/*.yaml); the CLI's options and `--set` change fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import celltron.config as typed_config
from celltron.config import check_sections, one_of
from celltron.errors import ConfigError
from celltron.ranges import ranged
from celltron.training.config import LoggingSection, OptimSection, TrainerSection

SPLITS = ("heldout", "simulation", "leave_one_out")
DRUG_MODES = ("ic50", "expression")
HEAD_TYPES = ("retrieval", "bilinear")
ANCHORS = ("anchored", "plain")
GRAPH_FEATURES = ("learned", "model", "coexpression")  # celltron.finetune.perturbation.graph's node features
GRAPH_CONTROLS = ("none", "permuted")
INTERVALS = ("ensemble", "mc_dropout", "none")  # predictive intervals (celltron.finetune.uncertainty)
ENCODERS = ("tuned", "frozen")  # fine-tuned with the head, or a frozen encoder whose views are computed once
DRUG_SPLITS = {"ic50": ("random", "cell_line", "drug"), "expression": ("heldout_combination", "heldout_drug")}


@dataclass
class AdaptSection:
    """How the pretrained encoder is adapted.

    freeze_layers: keep the embeddings and the first N encoder layers fixed (0: train all).
    lora_rank: train LoRA adapters of this rank (through `peft`) instead of the encoder's
        weights (0: no LoRA). The task head always trains.
    lora_alpha: LoRA scaling numerator (default: twice the rank).
    lora_dropout: dropout on the LoRA path.
    """

    freeze_layers: int = ranged(0, ">= 0")
    lora_rank: int = ranged(0, ">= 0")
    lora_alpha: float | None = ranged(None, "> 0")
    lora_dropout: float = ranged(0.05, "[0, 1)")


@dataclass
class LabDataSection:
    """The lab's AnnData and how batches are made of it.

    path: the .h5ad (or 10x .h5 / mtx folder) of raw counts; `--data` overrides it.
    layer: which matrix holds raw counts ('X', 'raw' or a layer name).
    gene_column: var column of gene symbols or Ensembl IDs (default: var_names).
    species: human or mouse (default: inferred from the gene names).
    min_mapped_fraction: share of counts that must map to Ensembl IDs (and reach the model's tokens).
    batch_size: examples per batch. num_workers: DataLoader worker processes.
    """

    path: str = ""
    layer: str = "X"
    gene_column: str | None = None
    species: str | None = one_of(None, ("human", "mouse"))
    min_mapped_fraction: float = ranged(0.5, "[0, 1]")
    batch_size: int = ranged(32, ">= 1")
    num_workers: int = ranged(0, ">= 0")


@dataclass
class PerturbationSection:
    """The perturbation-response task (GEARS's data format).

    perturbation_key: obs column naming each cell's perturbation (`A`, or `A+B` combinations).
    control: the label of unperturbed cells in that column.
    split: heldout (a share of perturbations held out), simulation (GEARS's: unseen
        singles, and combinations by how many of their genes were seen alone) or
        leave_one_out (each perturbation held out once, one fine-tuning per perturbation and
        seed; a held-out single also keeps the combinations holding its gene out of training).
    test_fraction: share of (single) perturbations held out (heldout, simulation).
    seeds: one split and one fine-tuning run per seed (leave_one_out: the training randomness);
        metrics are aggregated over them.
    headline: the metric the best baseline is chosen on (inner cross-validation over training
        perturbations) and the model is compared on, per perturbation with an interval.
    responsive_min_de: a perturbation is "responsive" when at least this many genes besides its
        targets differ from control at FDR 0.05; declared from the data before any model runs,
        and every predictor is also scored on the responsive held-out perturbations.
    coexpression_reference: an .h5ad of raw counts of the same species (any atlas), or a
        celltron corpus folder (e.g. the model's pretraining corpus: its first 50,000 training
        cells streamed once into a Frequent Directions sketch); its genes' co-expression (PCA
        loadings of log-normalised expression) embeds the targets for the `linear_coexpression` baseline, so targets the screen does
        not measure still get an embedding. With --model, `linear_model` embeds them by the
        model's gene-token embeddings.
    eval_cells: control cells whose predictions are averaged into a perturbation's prediction.
    de_genes: DE genes per perturbation (top by |Welch t| against control), scored apart.
    de_weight: extra loss weight on each training perturbation's DE genes.
    head: anchored (the prediction is the best baseline plus a weighted model residual,
        baseline + w x (model - baseline), w chosen from anchor_weights by inner
        cross-validation over the training perturbations: w = 0 is the baseline exactly) or
        plain (the model's own prediction). Anchoring trains inner_folds + 1 models per fold.
    head_type: retrieval (a mix of training perturbations' shifts, attended to from the
        encoder's view of the targets, leave-one-out in training) or bilinear (per-gene scores
        from the pretrained gene embeddings); see celltron.finetune.perturbation.PerturbationModel.
    anchor_weights: the residual weights the anchored head chooses from: the smallest (the
        baseline) unless a larger one gains beyond the 95% interval over resampled inner
        held-out perturbations (report.earned_weight).
    inner_folds: folds of the inner cross-validations over training perturbations (the best
        baseline, the anchored head's weight).
    learning_rates: the learning rates the anchored head chooses from by the same inner
        cross-validation (empty: optim.lr only; one inner run per rate); ties: the first listed.
    step_fractions: training lengths, as shares of trainer.max_steps, chosen with the learning
        rate (predictions taken as one run passes each length); ties: the shorter. Both are
        chosen on the model alone's inner headline score, the weight on the blend at them.
    encoder: tuned (the encoder trains with the head and a learned flag on the targets, as
        model.freeze_layers / lora_rank say) or frozen (the pretrained encoder's view of each
        pair of eval_cells control cells x perturbation is computed once, in eval mode, with
        the targets' tokens in the cell and no flag; only the head trains on those views, and
        every perturbation's prediction averages the same cells: minutes instead of hours on a
        CPU).
    graph_head: also train the gene-graph head (GEARS-style: perturbation embeddings propagated
        over a gene graph, so unseen genes borrow from their neighbours; see
        celltron.finetune.perturbation.graph), reported beside the model and the baselines; runs
        with --baselines-only too (it needs no pretrained model).
    graph_grn: a TF-target table (TRRUST format) whose pairs become edges of the gene graph.
    graph_neighbours: co-expression edges per gene: its most correlated measured genes in the
        control cells and, with coexpression_reference, its nearest graph genes by loadings
        there (0: no co-expression edges).
    graph_features: the graph nodes' starting vectors: learned (the graph alone), model (the
        pretrained model's gene-token embeddings, projected; needs --model) or coexpression
        (the coexpression_reference loadings, projected), each with a learned vector added.
    graph_dims / graph_layers / graph_steps / graph_lr: the head's width, graph convolutions (a
        held-out target further than this many edges from every training target is predicted as
        the training mean), full-batch training steps and learning rate; fixed, never chosen on
        held-out perturbations.
    intervals: the gene-graph head's predictive intervals: ensemble (ensemble_members heads from
        different seeds; the prediction is their mean), mc_dropout (one head trained with dropout
        0.1, dropout_passes predictions with it on) or none. Each interval is the prediction ±
        a scale x the spread, the scale calibrated on inner folds over the training
        perturbations (split conformal) to interval_level; each held-out perturbation also gets an
        OOD score (distance to its ood_neighbours nearest training perturbations, flagged beyond
        interval_level of the training perturbations' own); see
        celltron.finetune.perturbation.intervals. Unless none, the best baseline (every run) and
        the model head also get intervals: the prediction ± a scale x each gene's standard
        deviation over the training perturbations, the scale calibrated the same way (an anchored
        head on the inner folds that chose its setting and weight; a plain head on inner_folds
        models fitted for that alone, extra fits per outer fold).
    interval_level / ensemble_members / dropout_passes / ood_neighbours: as intervals says.
    interval_strata: none (one scale per fold over every gene) or predicted_change (Mondrian
        conformal: one scale for the genes each prediction moves most from the control mean, its
        top n_de, and one for the rest; known from the prediction alone, so DE genes can get wider
        intervals without the truth choosing them); see celltron.finetune.perturbation.intervals.
    graph_control: none, or permuted (the graph's gene labels shuffled, seeded: same size and
        degrees, wrong genes; the control for whether the graph's structure helps).
    """

    perturbation_key: str = "perturbation"
    control: str = "control"
    split: str = one_of("heldout", SPLITS)
    test_fraction: float = ranged(0.25, "(0, 1)")
    seeds: tuple[int, ...] = ranged((0,), ">= 0")
    eval_cells: int = ranged(256, ">= 1")
    de_genes: int = ranged(20, ">= 1")
    de_weight: float = ranged(1.0, ">= 0")
    head: str = one_of("anchored", ANCHORS)
    head_type: str = one_of("retrieval", HEAD_TYPES)
    anchor_weights: tuple[float, ...] = ranged((0.0, 0.25, 0.5, 0.75, 1.0), "[0, 1]")
    inner_folds: int = ranged(3, ">= 2")
    learning_rates: tuple[float, ...] = ranged((), "> 0")
    step_fractions: tuple[float, ...] = ranged((1.0,), "(0, 1]")
    headline: str = "pearson_delta_de20_notarget"
    responsive_min_de: int = ranged(10, ">= 1")
    coexpression_reference: str = ""
    encoder: str = one_of("tuned", ENCODERS)
    graph_head: bool = False
    graph_grn: str = ""
    graph_neighbours: int = ranged(10, ">= 0")
    graph_features: str = one_of("learned", GRAPH_FEATURES)
    graph_dims: int = ranged(32, ">= 1")
    graph_layers: int = ranged(2, ">= 0")
    graph_steps: int = ranged(300, ">= 1")
    graph_lr: float = ranged(0.01, "> 0")
    graph_control: str = one_of("none", GRAPH_CONTROLS)
    intervals: str = one_of("ensemble", INTERVALS)
    interval_level: float = ranged(0.9, "(0, 1)")
    interval_strata: str = one_of("none", ("none", "predicted_change"))
    ensemble_members: int = ranged(5, ">= 2")
    dropout_passes: int = ranged(20, ">= 2")
    ood_neighbours: int = ranged(3, ">= 1")


@dataclass
class DrugSection:
    """The drug-response task.

    mode: ic50 (ln(IC50) of cell line x drug pairs, GDSC) or expression (chemCPA style: the mean
        expression of cells treated with a drug at a dose, from the control cells, the drug's
        fingerprint and the dose).
    split: ic50: random (pairs), cell_line (whole cell lines held out) or drug (whole drugs held
        out); expression: heldout_combination (drug x dose combinations held out, each drug
        keeping a dose in training) or heldout_drug (whole drugs, every dose). '' takes the
        mode's first (random, heldout_combination).
    test_fraction: share of pairs / cell lines / drugs / combinations held out.
    seeds: one split and one run per seed.
    drug_list: ic50: the GDSC drug list (drug_id, ..., PubCHEM) joining drug ids to PubChem CIDs.
    smiles: ic50: `PubChem CID<TAB>SMILES` lines; expression: `DRUG<TAB>SMILES` lines, DRUG as
        labelled in the screen's drug column.
    hidden: width of the model's embeddings and MLPs.
    expression: ic50: an .h5ad of raw counts with one row per cell line. The model then sees a
        cell line through its expression (the pretrained model's mean-pooled embedding with
        --model, else its PCA) instead of a learned per-line embedding, so unseen cell lines
        are predicted from their profile; the ridge baseline gets the PCA too. IC50 cell lines
        without a row are dropped with a warning and counted in metrics.json.
    cell_line_key: obs column of that file holding the IC50 table's cell-line ids ('': obs names).
    pca_components: principal components of the cell lines' log-normalised expression, fitted
        on the training cell lines of each split.
    drug_key: expression: obs column of each cell's drug.
    dose_key: expression: obs column of its dose (a number, any unit; treated cells > 0).
    cell_type_key: expression: obs column of its cell type ('': all cells are one type).
    control: expression: drug label of control (vehicle) cells; cells at dose 0 are controls too.
    n_genes: expression: the most variable genes (log-normalised) that are predicted; 0: all.
    control_cells: expression with --model: control cells per cell type the pretrained model
        embeds; their mean embedding is the cell type's basal state.
    head: anchored (the prediction is the best baseline plus a weighted model residual,
        baseline + w x (model - baseline), w chosen from anchor_weights by inner
        cross-validation over the training units, grouped as the split: w = 0 is the baseline
        exactly) or plain (the model's own prediction). Anchoring trains one model per inner
        fold besides the outer one, per seed. In both modes (ic50: drugs, cell lines or pairs;
        expression: drugs or drug x dose combinations).
    anchor_weights: the residual weights the anchored head chooses from: the smallest unless a
        larger one gains beyond the 95% interval over resampled inner held-out units
        (report.earned_weight; ties: the smaller).
    step_fractions: the model's training lengths the anchored head chooses from, as shares of
        trainer.max_steps, by the same inner cross-validation (on the model alone; ties: the
        shorter). One run per fit: predictions are taken as training passes each length.
    learning_rates: the learning rates chosen with the length (empty: optim.lr only; one inner
        run per rate; ties: the first listed).
    interval_level: ic50: the level of the best baseline's predictive intervals (split conformal
        on inner folds over the training units) and of the OOD flags (a held-out drug or cell
        line farther from the training ones than this share of them are from the rest); see
        celltron.finetune.drug.intervals. 0: neither (no extra inner cross-validation).
    intervals: ic50, with a model: the reported model's own intervals (needs interval_level >
        0): mc_dropout (dropout_passes predictions of the model with dropout on) or ensemble
        (ensemble_members models from different seeds, the first the reported one), or none.
        The interval is the prediction ± scale x the spread (x the anchor weight), the scale
        calibrated by split conformal prediction on models refitted on each inner fold over the
        training units at the chosen setting; a weight-0 anchored model is the best baseline and
        takes its interval. Extra fits per seed: mc_dropout INNER_FOLDS, ensemble (members - 1)
        + members x INNER_FOLDS.
    ensemble_members / dropout_passes: as intervals says.
    target_grn: ic50: a TF-target table (TRRUST format). Its graph's spectral embedding gives
        each gene a row (target_prior_dims wide), and the similar_drugs kernel may add the
        cosine of two drugs' mean target rows (celltron.finetune.drug.target_priors), chosen or
        not by the kernel's inner cross-validation.
    target_table: ic50: any gene x d table (CSV, or TSV; first column gene symbols or Ensembl
        IDs) used the same way (with target_grn: the mean of the two cosines).
    target_prior_dims: width of target_grn's embedding.
    """

    mode: str = one_of("ic50", DRUG_MODES)
    split: str = one_of("", ("", *DRUG_SPLITS["ic50"], *DRUG_SPLITS["expression"]))
    test_fraction: float = ranged(0.2, "(0, 1)")
    seeds: tuple[int, ...] = ranged((0,), ">= 0")
    drug_list: str = ""
    smiles: str = ""
    hidden: int = ranged(128, ">= 1")
    expression: str = ""
    cell_line_key: str = ""
    pca_components: int = ranged(20, ">= 1")
    drug_key: str = "drug"
    dose_key: str = "dose"
    cell_type_key: str = "cell_type"
    control: str = "control"
    n_genes: int = ranged(2000, ">= 0")  # 0: all genes
    control_cells: int = ranged(256, ">= 1")
    head: str = one_of("anchored", ANCHORS)
    anchor_weights: tuple[float, ...] = ranged((0.0, 0.25, 0.5, 0.75, 1.0), "[0, 1]")
    step_fractions: tuple[float, ...] = ranged((0.25, 0.5, 1.0), "(0, 1]")
    learning_rates: tuple[float, ...] = ranged((), "> 0")
    interval_level: float = ranged(0.9, "[0, 1)")
    intervals: str = one_of("none", INTERVALS)
    ensemble_members: int = ranged(5, ">= 2")
    dropout_passes: int = ranged(20, ">= 2")
    target_grn: str = ""
    target_table: str = ""
    target_prior_dims: int = ranged(32, ">= 2")

    def split_kind(self) -> str:
        """The split to make: `split`, or the mode's default when it is ''."""
        return self.split or DRUG_SPLITS.get(self.mode, ("",))[0]


@dataclass
class AnnotateSection:
    """The cell-type annotation task.

    label_key: obs column of cell-type labels.
    test_fraction: share of cells held out (stratified by label).
    seeds: one split and one fine-tuning run per seed; metrics are aggregated over them.
    balanced: weight each class's loss by n / (classes x its count), and the same in the
        baseline's logistic regression (macro-F1 counts every class alike).
    dropout: dropout on the cell embedding before the classification layer.
    pca_components: principal components the baseline's logistic regression uses.
    head: anchored (class probabilities: the baseline's plus w x the model's difference from
        them, w chosen from anchor_weights on macro-F1 by inner_folds-fold stratified
        cross-validation over the training cells, a model trained per inner fold; w = 0 is
        the baseline exactly) or plain (the model alone).
    anchor_weights: the weights the anchored head chooses from: the smallest unless a larger
        one gains beyond the 95% interval over resampled inner held-out cells
        (report.earned_weight; ties: the smaller).
    inner_folds: folds of that inner cross-validation.
    encoder: tuned (the encoder trains with the head, as model.freeze_layers / lora_rank say)
        or frozen (a linear probe: every cell is embedded once by the pretrained encoder, in
        eval mode, and only the head trains on those embeddings; minutes instead of hours on
        a CPU, and what a lab asks first: does the pretrained embedding already separate my
        cell types?).
    learning_rates: the head's learning rates the anchored head chooses from by the same inner
        cross-validation (empty: optim.lr only); ties go to the first listed.
    step_fractions: training lengths, as shares of trainer.max_steps, chosen with the learning
        rate (predictions taken as one run passes each length, so a length costs no extra run);
        ties go to the shorter. The learning rate and length are chosen on the model alone's
        inner macro-F1, the weight on the blend at that setting.
    interval_level: the level of the baseline's conformal prediction sets and of the held-out
        cells' OOD flags (see celltron.finetune.annotate.baseline_uncertainty), and of the
        anchored head's own sets and the model alone's at the same setting (both calibrated on
        the inner folds that chose the setting and weight: `inner_conformal_threshold`, no extra
        fit); a plain head's sets are calibrated the same way on inner_folds models fitted for
        that alone (`calibration_folds`: inner_folds extra fits per seed); 0: none of them.
    intervals: how the model predicts, and how unsure it says it is: none (one model, dropout
        off), mc_dropout (one model, dropout_passes predictions with every dropout layer on:
        the head's, and a tuned encoder's) or ensemble (ensemble_members models from different
        seeds on the same cells; tuned encoders: that many fine-tunings per fit). The model's
        probabilities are then the mean of those predictions everywhere (inner folds and the
        held-out cells, so the setting, the weight and the sets are those of the averaged
        model), and each cell gets their disagreement (`uncertainty.mutual_information`), in
        predictions.h5ad and, against the model's errors on held-out cells, in metrics.json.
    ensemble_members / dropout_passes: as intervals says.
    """

    label_key: str = "cell_type"
    test_fraction: float = ranged(0.2, "(0, 1)")
    seeds: tuple[int, ...] = ranged((0,), ">= 0")
    balanced: bool = True
    dropout: float = ranged(0.1, "[0, 1)")
    interval_level: float = ranged(0.9, "[0, 1)")
    pca_components: int = ranged(50, ">= 1")
    head: str = one_of("anchored", ANCHORS)
    anchor_weights: tuple[float, ...] = ranged((0.0, 0.25, 0.5, 0.75, 1.0), "[0, 1]")
    inner_folds: int = ranged(2, ">= 2")
    encoder: str = one_of("tuned", ENCODERS)
    learning_rates: tuple[float, ...] = ranged((), "> 0")
    step_fractions: tuple[float, ...] = ranged((1.0,), "(0, 1]")
    intervals: str = one_of("none", INTERVALS)
    ensemble_members: int = ranged(5, ">= 2")
    dropout_passes: int = ranged(20, ">= 2")


CROSSMODAL_TASKS = ("predict", "align", "annotate")
CROSSMODAL_SPLITS = ("random", "batch")
CROSSMODAL_INTERVALS = ("none", "mc_dropout")  # a ridge on a frozen encoder is deterministic: no ensemble


@dataclass
class CrossModalSection:
    """The cross-modal tasks on paired cells (`celltron finetune cross-modal TASK`).

    task: predict (the target modality of held-out cells from their RNA alone: proteins, as CLR
        values), align (each modality of held-out cells embedded apart, scored by FOSCTTM,
        recall@k of the true partner and label transfer) or annotate (cell types by kNN on a
        joint embedding of both modalities, on the same folds as RNA alone).
    modalities: one file per modality, NAME=FILE (e.g. rna=A.h5ad, adt=B.h5ad), joined on obs
        names; instead of data.path (--data), which takes one .h5mu or multi-feature 10x .h5.
    source: the modality predicted from / embedded first (rna, adt, atac; any spelling
        `corpus build` accepts). target: the other one.
    label_key: obs column of cell types (align: label transfer; annotate: required; predict:
        scores per cell type). '' : none.
    batch_key: obs column of batches or donors, for split batch.
    split: random (a share of cells held out per seed) or batch (a share of the batch_key's
        batches held out per seed, whole).
    test_fraction: share of cells (random) or batches (batch) held out.
    seeds: one split per seed; metrics aggregate over them.
    components: PCA components of RNA and proteins, LSI components of chromatin.
    top_genes: most variable genes (on training cells) the RNA PCA uses.
    knn_k: kNN regression's neighbour counts, one chosen by inner CV on training cells.
    ridge_alphas: ridge regression's penalties, one chosen by inner CV on training cells.
    inner_folds: folds of those inner cross-validations (and of the best baseline's choice).
    cca_components: canonical pairs the CCA alignment keeps.
    recall_k: the k of recall@k.
    neighbors: neighbours of the kNN classifiers (label transfer, annotate).
    folds: annotate: stratified folds per seed (every cell held out once per seed).
    query: predict: an .h5ad of RNA-only cells (raw counts) whose target modality is predicted
        by the best baseline fitted on every paired cell; its genes are matched to the training
        RNA's by name. '' : none.
    umap: write a UMAP PNG (align: held-out cells coloured by modality and by label; annotate:
        the joint embedding by label); needs umap-learn (celltron[eval]).
    train_only: a text file of cell names (one per line) that are always training cells, never
        held out: e.g. the cells a model was pretrained on. Held-out cells are then drawn from the
        other cells (test_fraction is their share of those; split batch holds out only batches
        without such cells), and the model's inner choices (weight, alignment, head) are scored on
        training cells outside the list only: a model pretrained on a cell's pair scores it too
        well. '' : none.
    head: predict with --model: anchored (the best baseline plus w x (model − best baseline), w
        chosen from anchor_weights by inner CV over training cells, proteins as units: the
        smallest unless a larger one gains beyond the 95% interval; w = 0 is the baseline
        exactly) or plain (the model's ridge head alone).
    anchor_weights: the weights the anchored head chooses from.
    peers: scvi-tools models run on the same splits and scored by the same functions, reported
        beside the baselines (not candidates for the best baseline: choosing them by inner CV
        would train them again per fold): totalvi (predict, proteins) and multivi (align, RNA +
        chromatin). Needs scvi-tools (celltron[scvi]). [] : none.
    peer_epochs: the peers' maximum epochs (0: 200 for totalvi, 100 for multivi).
    peer_genes: the most variable training genes (seurat_v3) the peers read.
    interval_level: predict: the level of the best baseline's per-protein intervals (split
        conformal on training cells predicted out of fold) and of the held-out cells' OOD flags
        (RNA PCA distance, calibrated on held-out training cells); see
        celltron.finetune.crossmodal.run.prediction_uncertainty. 0: neither.
    intervals: predict with --model: none, or mc_dropout: the model alone's (its ridge head's)
        intervals from dropout_passes embeddings of each cell with the encoder's dropout on, the
        ridge applied to each: prediction ± q x their spread, q per protein split conformal on
        inner folds over the training cells (needs interval_level > 0). An ensemble is not
        offered: the ridge on one frozen encoder is deterministic, so its members would agree.
    dropout_passes: as intervals says.
    """

    task: str = one_of("predict", CROSSMODAL_TASKS)
    modalities: tuple[str, ...] = ()
    source: str = "rna"
    target: str = "adt"
    label_key: str = ""
    batch_key: str = ""
    split: str = one_of("random", CROSSMODAL_SPLITS)
    test_fraction: float = ranged(0.2, "(0, 1)")
    seeds: tuple[int, ...] = ranged((0,), ">= 0")
    components: int = ranged(50, ">= 2")
    top_genes: int = ranged(2000, ">= 0")
    knn_k: tuple[int, ...] = ranged((5, 15, 50), ">= 1")
    ridge_alphas: tuple[float, ...] = ranged((0.1, 1.0, 10.0, 100.0, 1000.0), "> 0")
    interval_level: float = ranged(0.9, "[0, 1)")
    inner_folds: int = ranged(3, ">= 2")
    intervals: str = one_of("none", CROSSMODAL_INTERVALS)
    dropout_passes: int = ranged(20, ">= 2")
    cca_components: int = ranged(20, ">= 1")
    recall_k: tuple[int, ...] = ranged((1, 5, 10), ">= 1")
    neighbors: int = ranged(15, ">= 1")
    folds: int = ranged(5, ">= 2")
    query: str = ""
    umap: bool = True
    train_only: str = ""
    head: str = one_of("anchored", ANCHORS)
    anchor_weights: tuple[float, ...] = ranged((0.0, 0.25, 0.5, 0.75, 1.0), "[0, 1]")
    peers: tuple[str, ...] = ()
    peer_epochs: int = ranged(0, ">= 0")
    peer_genes: int = ranged(4000, ">= 1")


@dataclass
class FinetuneConfig:
    model: AdaptSection = field(default_factory=AdaptSection)
    data: LabDataSection = field(default_factory=LabDataSection)
    perturbation: PerturbationSection = field(default_factory=PerturbationSection)
    drug: DrugSection = field(default_factory=DrugSection)
    annotate: AnnotateSection = field(default_factory=AnnotateSection)
    crossmodal: CrossModalSection = field(default_factory=CrossModalSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def check(self, where: str = "config") -> FinetuneConfig:
        """Refuse inconsistent settings, naming the field and the fix."""
        check_sections(self, where)
        if self.model.freeze_layers and self.model.lora_rank:
            raise ConfigError(f"{where}: choose model.freeze_layers (--freeze) or model.lora_rank (--lora), not both")
        self._check_perturbation(where)
        self._check_annotate(where)
        if self.trainer.strategy.startswith("deepspeed_stage_3"):
            raise ConfigError(
                f"{where}: trainer.strategy {self.trainer.strategy}: fine-tuning evaluates the whole model in one process, "
                "which ZeRO-3's sharded weights cannot; use ddp, fsdp, deepspeed_stage_1 or deepspeed_stage_2"
            )
        self._check_drug(where)
        self._check_crossmodal(where)
        return self

    def _check_perturbation(self, where: str) -> None:
        from celltron.finetune.perturbation.evaluate import METRICS

        if not self.perturbation.seeds:
            raise ConfigError(f"{where}: perturbation.seeds is empty; give at least one seed")
        if self.perturbation.headline not in METRICS:
            raise ConfigError(f"{where}: perturbation.headline {self.perturbation.headline!r} is not one of {METRICS}")
        if not self.perturbation.anchor_weights:
            raise ConfigError(f"{where}: perturbation.anchor_weights is empty; give at least one weight in [0, 1]")
        if not self.perturbation.step_fractions:
            raise ConfigError(
                f"{where}: perturbation.step_fractions is empty; give at least one share of trainer.max_steps in (0, 1]"
            )
        self._check_frozen("perturbation", where)
        if self.perturbation.graph_features == "coexpression" and not self.perturbation.coexpression_reference:
            raise ConfigError(
                f"{where}: perturbation.graph_features coexpression needs perturbation.coexpression_reference "
                "(--coexpression-reference H5AD_OR_CORPUS)"
            )

    def _check_annotate(self, where: str) -> None:
        section = self.annotate
        if not section.anchor_weights:
            raise ConfigError(f"{where}: annotate.anchor_weights is empty; give at least one weight in [0, 1]")
        if not section.step_fractions:
            raise ConfigError(
                f"{where}: annotate.step_fractions is empty; give at least one share of trainer.max_steps in (0, 1]"
            )
        self._check_frozen("annotate", where)

    def _check_frozen(self, task: str, where: str) -> None:
        if getattr(self, task).encoder == "frozen" and (self.model.freeze_layers or self.model.lora_rank):
            raise ConfigError(
                f"{where}: {task}.encoder frozen (--encoder frozen) trains the head alone; "
                "drop model.freeze_layers (--freeze) and model.lora_rank (--lora), which are for a tuned encoder"
            )

    def _check_drug(self, where: str) -> None:
        drug = self.drug
        if drug.split_kind() not in DRUG_SPLITS[drug.mode]:
            raise ConfigError(
                f"{where}: drug.split {drug.split!r} does not apply to mode {drug.mode}; "
                f"use one of {DRUG_SPLITS[drug.mode]} (--split)"
            )
        if not drug.seeds:
            raise ConfigError(f"{where}: drug.seeds is empty; give at least one seed")
        if not drug.anchor_weights:
            raise ConfigError(f"{where}: drug.anchor_weights is empty; give at least one weight in [0, 1]")
        if not drug.step_fractions:
            raise ConfigError(f"{where}: drug.step_fractions is empty; give at least one share of trainer.max_steps in (0, 1]")
        if drug.mode == "expression" and (drug.target_grn or drug.target_table):
            raise ConfigError(
                f"{where}: drug.target_grn / drug.target_table weigh GDSC drugs by their targets in ic50 mode; "
                "expression mode has no target list: unset them"
            )
        if drug.mode == "expression" and drug.expression:
            raise ConfigError(
                f"{where}: drug.expression (--expression) is for ic50 mode's cell lines; "
                "expression mode reads the screen from --data"
            )

    def _check_crossmodal(self, where: str) -> None:
        section = self.crossmodal
        for name in ("seeds", "knn_k", "ridge_alphas", "recall_k", "anchor_weights"):
            if not getattr(section, name):
                raise ConfigError(f"{where}: crossmodal.{name} is empty; give at least one value")
        if section.split == "batch" and not section.batch_key:
            raise ConfigError(
                f"{where}: crossmodal.split batch needs crossmodal.batch_key (--batch-key), the obs column of batches"
            )
        if section.task == "annotate" and not section.label_key:
            raise ConfigError(
                f"{where}: cross-modal annotate needs crossmodal.label_key (--label-key), the obs column of cell types"
            )
        from celltron.corpus.modalities import modality_name
        from celltron.finetune.crossmodal.peers import check_peer

        for peer in section.peers:
            modalities = (modality_name(section.source, "crossmodal.source"), modality_name(section.target, "crossmodal.target"))
            check_peer(peer, section.task, modalities, where)
        if section.query and section.task != "predict":
            raise ConfigError(f"{where}: crossmodal.query (--query) is for the predict task; drop it for {section.task}")
        if section.intervals != "none" and (section.task != "predict" or section.interval_level == 0):
            raise ConfigError(
                f"{where}: crossmodal.intervals {section.intervals} gives the predict task's model intervals and needs "
                f"crossmodal.interval_level above 0 (e.g. 0.9); set crossmodal.intervals to none"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def load_finetune_config(path, overrides: list[str] | None = None) -> FinetuneConfig:
    return typed_config.load_config(FinetuneConfig, path, overrides)
