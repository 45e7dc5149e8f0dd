"""A fine-tuning run, fully described: how the pretrained model is adapted, the lab data, the
task's options, and the optimiser, trainer and logging sections shared with pretraining.
YAML spells them out (configs/finetune/*.yaml); the CLI's options and `--set` change fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from celltron.pretrain.config import LoggingSection, OptimSection, TrainerSection, check_trainer, load_config

SPLITS = ("heldout", "simulation")
HEADS = ("retrieval", "bilinear")


@dataclass
class AdaptSection:
    """How the pretrained encoder is adapted.

    freeze_layers: keep the embeddings and the first N encoder layers fixed (0: train all).
    lora_rank: train LoRA adapters of this rank (through `peft`) instead of the encoder's
        weights (0: no LoRA). The task head always trains.
    lora_alpha: LoRA scaling numerator (default: twice the rank).
    lora_dropout: dropout on the LoRA path.
    """

    freeze_layers: int = 0
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.05


@dataclass
class LabDataSection:
    """The lab's AnnData and how batches are made of it.

    path: the .h5ad (or 10x .h5 / mtx folder) of raw counts; `--data` overrides it.
    layer: which matrix holds raw counts ('X', 'raw' or a layer name).
    gene_column: var column of gene symbols or Ensembl IDs (default: var_names).
    species: human or mouse (default: inferred from the gene names).
    batch_size: examples per batch. num_workers: DataLoader worker processes.
    """

    path: str = ""
    layer: str = "X"
    gene_column: str | None = None
    species: str | None = None
    batch_size: int = 32
    num_workers: int = 0


@dataclass
class PerturbationSection:
    """The perturbation-response task (GEARS's data format).

    perturbation_key: obs column naming each cell's perturbation (`A`, or `A+B` combinations).
    control: the label of unperturbed cells in that column.
    split: heldout (a share of perturbations held out) or simulation (GEARS's: unseen
        singles, and combinations by how many of their genes were seen alone).
    test_fraction: share of (single) perturbations held out.
    seeds: one split and one fine-tuning run per seed; metrics are aggregated over them.
    eval_cells: control cells whose predictions are averaged into a perturbation's prediction.
    de_genes: DE genes per perturbation (top by |Welch t| against control), scored apart.
    de_weight: extra loss weight on each training perturbation's DE genes.
    head: retrieval (a mix of training perturbations' shifts, attended to from the encoder's
        view of the targets, leave-one-out in training) or bilinear (per-gene scores from the
        pretrained gene embeddings); see celltron.finetune.perturbation.PerturbationModel.
    """

    perturbation_key: str = "perturbation"
    control: str = "control"
    split: str = "heldout"
    test_fraction: float = 0.25
    seeds: tuple = (0,)
    eval_cells: int = 256
    de_genes: int = 20
    de_weight: float = 1.0
    head: str = "retrieval"


@dataclass
class DrugSection:
    """The drug-response task.

    mode: ic50 (ln(IC50) of cell line x drug pairs).
    split: random (pairs), cell_line (whole cell lines held out) or drug (whole drugs held out).
    test_fraction: share of pairs / cell lines / drugs held out.
    seeds: one split and one run per seed.
    drug_list: the GDSC drug list (drug_id, ..., PubCHEM) joining drug ids to PubChem CIDs.
    smiles: `PubChem CID<TAB>SMILES` lines.
    hidden: width of the model's embeddings and MLPs.
    """

    mode: str = "ic50"
    split: str = "random"
    test_fraction: float = 0.2
    seeds: tuple = (0,)
    drug_list: str = ""
    smiles: str = ""
    hidden: int = 128


@dataclass
class FinetuneConfig:
    model: AdaptSection = field(default_factory=AdaptSection)
    data: LabDataSection = field(default_factory=LabDataSection)
    perturbation: PerturbationSection = field(default_factory=PerturbationSection)
    drug: DrugSection = field(default_factory=DrugSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def check(self, where: str = "config") -> "FinetuneConfig":
        """Refuse inconsistent settings, naming the field and the fix."""
        if self.model.freeze_layers < 0 or self.model.lora_rank < 0:
            raise ValueError(f"{where}: model.freeze_layers and model.lora_rank must be >= 0")
        if self.model.freeze_layers and self.model.lora_rank:
            raise ValueError(f"{where}: choose model.freeze_layers (--freeze) or model.lora_rank (--lora), not both")
        if self.perturbation.split not in SPLITS:
            raise ValueError(f"{where}: perturbation.split {self.perturbation.split!r} is not one of {SPLITS}")
        if self.perturbation.head not in HEADS:
            raise ValueError(f"{where}: perturbation.head {self.perturbation.head!r} is not retrieval or bilinear")
        if not 0 < self.perturbation.test_fraction < 1:
            raise ValueError(f"{where}: perturbation.test_fraction must lie between 0 and 1")
        if not self.perturbation.seeds:
            raise ValueError(f"{where}: perturbation.seeds is empty; give at least one seed")
        if self.drug.mode != "ic50":
            raise ValueError(f"{where}: drug.mode {self.drug.mode!r}: only ic50 is built so far")
        if self.drug.split not in ("random", "cell_line", "drug"):
            raise ValueError(f"{where}: drug.split {self.drug.split!r} is not random, cell_line or drug")
        check_trainer(self.trainer, where)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def load_finetune_config(path, overrides: list[str] | None = None) -> FinetuneConfig:
    return load_config(path, overrides, FinetuneConfig)

