"""A pretraining run, fully described: one typed dataclass per section; YAML only spells them
out (configs/pretrain/*.yaml), and `--set section.field=value` changes single fields."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from celltron.errors import ConfigError
from celltron.inputs import parse_yaml, read_yaml
from celltron.ranges import check_ranges, ranged

FAMILY_SCHEMES = {"geneformer": ("geneformer-v1", "geneformer-v2"), "scgpt": ("scgpt",), "genecompass": ("ortholog",)}
STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload")
PRECISIONS = ("32", "bf16-mixed", "fp16-mixed", "32-true")


@dataclass
class ModelSection:
    """family: geneformer | scgpt | genecompass. size: a named size (`celltron models`).
    overrides: config fields changed from the size (e.g. {max_position_embeddings: 1024})."""

    family: str = "geneformer"
    size: str = "debug"
    overrides: dict = field(default_factory=dict)


@dataclass
class TokenizerSection:
    """scheme: geneformer-v1 | geneformer-v2 (geneformer), scgpt (scgpt), ortholog (genecompass).
    max_len: tokens per cell (default: the scheme's own)."""

    scheme: str = "geneformer-v2"
    max_len: int | None = ranged(None, ">= 1")


@dataclass
class DataSection:
    """Where cells come from and how they become batches.

    corpus: corpus directory or URL (s3://...); `--corpus` overrides it.
    storage_options: fsspec options for remote corpora.
    batch_size: cells per batch (padded), or rows of `max_tokens` tokens per batch (packed).
    packing: pack whole cells into rows of `max_tokens` (varlen attention) instead of padding.
    max_tokens: row length when packing.
    round_cells: cells tokenised, masked and batched together; padded batches are grouped by
        length within a round; resume restarts at a round and skips its used batches.
    num_workers: DataLoader worker processes (0: the main process).
    block_size, buffer_size: the corpus stream's block and shuffle-window sizes.
    mask_probability: share of tokens predicted (geneformer, genecompass MLM).
    mask_ratio: share of values hidden (scgpt).
    generative: scgpt only, predict the hidden values in the generative attention-mask mode.
    val_batches: validation batches per evaluation (from the corpus's val split).
    """

    corpus: str = ""
    storage_options: dict = field(default_factory=dict)
    batch_size: int = ranged(8, ">= 1")
    packing: bool = False
    max_tokens: int = ranged(4096, ">= 1")
    round_cells: int = ranged(512, ">= 1")
    num_workers: int = ranged(0, ">= 0")
    block_size: int = ranged(256, ">= 1")
    buffer_size: int = ranged(2048, ">= 1")
    mask_probability: float = ranged(0.15, "(0, 1)")
    mask_ratio: float = ranged(0.4, "(0, 1)")
    generative: bool = False
    val_batches: int = ranged(8, ">= 0")


@dataclass
class OptimSection:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio` x lr at max_steps."""

    lr: float = ranged(1e-3, "> 0")
    weight_decay: float = ranged(0.01, ">= 0")
    betas: tuple = ranged((0.9, 0.999), "[0, 1)")
    eps: float = ranged(1e-8, "> 0")
    warmup_steps: int = ranged(100, ">= 0")
    min_lr_ratio: float = ranged(0.1, "[0, 1]")
    grad_clip: float = ranged(1.0, ">= 0")  # 0: no clipping
    accumulate: int = ranged(1, ">= 1")


@dataclass
class TrainerSection:
    """max_steps: optimiser steps of the run. val_every / log_every / checkpoint_every: in steps.
    strategy, precision, devices, num_nodes: as Lightning's Trainer ('auto' picks CUDA, MPS or
    CPU). deterministic: deterministic algorithms (exact resume on CPU). seed: everything.
    activation_checkpointing: recompute layer activations in the backward pass.
    deepspeed_config: a DeepSpeed JSON (configs/deepspeed/) used with the deepspeed strategies;
        its ZeRO stage must be the strategy's.
    stop_at_step: end this invocation at that step with a checkpoint, the schedule still
        running to max_steps (a long run in fixed-length jobs; continue with --resume auto)."""

    max_steps: int = ranged(300, ">= 1")
    val_every: int = ranged(100, ">= 1")
    log_every: int = ranged(10, ">= 1")
    checkpoint_every: int = ranged(100, ">= 1")
    strategy: str = "auto"
    precision: str = "32"
    devices: int | str = ranged("auto", ">= 1")
    num_nodes: int = ranged(1, ">= 1")
    accelerator: str = "auto"
    deterministic: bool = True
    seed: int = ranged(0, ">= 0")
    activation_checkpointing: bool = False
    deepspeed_config: str | None = None
    stop_at_step: int | None = ranged(None, ">= 1")


@dataclass
class LoggingSection:
    """wandb: log to Weights & Biases (online when WANDB_API_KEY is set, offline otherwise).
    project, name: the wandb project and run name. progress_bar: show Lightning's bar."""

    wandb: bool = True
    project: str = "celltron"
    name: str | None = None
    progress_bar: bool = True


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def check(self, where: str = "config") -> PretrainConfig:
        """Refuse inconsistent settings, naming the field and the fix."""
        from celltron.model_zoo import FAMILIES  # here: loading a config (launch, login nodes) must not need torch

        check_sections(self, where)
        if self.model.family not in FAMILIES:
            raise ConfigError(f"{where}: model.family {self.model.family!r} is not one of {sorted(FAMILIES)}")
        if self.model.size not in FAMILIES[self.model.family].sizes:
            raise ConfigError(
                f"{where}: model.size {self.model.size!r} is not a {self.model.family} size; known: {sorted(FAMILIES[self.model.family].sizes)}"
            )
        if self.tokenizer.scheme not in FAMILY_SCHEMES[self.model.family]:
            raise ConfigError(
                f"{where}: tokenizer.scheme {self.tokenizer.scheme!r} does not feed {self.model.family}; use {FAMILY_SCHEMES[self.model.family]}"
            )
        check_trainer(self.trainer, where)
        if self.data.generative and self.model.family != "scgpt":
            raise ConfigError(f"{where}: data.generative is scGPT's mode; set it only with model.family: scgpt")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def check_sections(config, where: str) -> None:
    """Every numeric field of every section in its allowed range (`ranged` beside the field)."""
    for spec in fields(config):
        check_ranges(getattr(config, spec.name), f"{where} [{spec.name}]")


def check_trainer(trainer: TrainerSection, where: str) -> None:
    if trainer.strategy not in STRATEGIES:
        raise ConfigError(f"{where}: trainer.strategy {trainer.strategy!r} is not one of {STRATEGIES}")
    if str(trainer.precision) not in PRECISIONS:
        raise ConfigError(f"{where}: trainer.precision {trainer.precision!r} is not one of {PRECISIONS}")


def _coerce(value, annotation: str, where: str):
    """A YAML value as the field's declared type (YAML reads `3e-4` as a string)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    for kind, convert in (("bool", None), ("int", int), ("float", float)):
        if kind not in kinds:
            continue
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false"):
                return str(value).lower() == "true"
            continue
        try:
            if isinstance(value, bool):
                break
            number = convert(value)
            if kind == "int" and isinstance(value, float) and number != value:
                continue
            return number
        except (TypeError, ValueError):
            continue
    if "str" in kinds and isinstance(value, (str, int, float)):
        return str(value)
    if "tuple" in kinds and isinstance(value, (list, tuple)):
        return tuple(value)
    if "dict" in kinds and isinstance(value, dict):
        return value
    raise ConfigError(f"{where}: {value!r} is not a valid {annotation}")


def _section(section_class, values: dict, where: str):
    declared = {f.name: str(f.type) for f in fields(section_class)}
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(declared)}")
    return section_class(**{name: _coerce(value, declared[name], f"{where} {name}") for name, value in values.items()})


def from_dict(values: dict, where: str = "config", config_class=None):
    """A config of `config_class` (default PretrainConfig) from a mapping of sections."""
    import typing

    config_class = config_class or PretrainConfig
    classes = typing.get_type_hints(config_class)
    unknown = sorted(set(values) - set(classes))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {sorted(classes)}")
    for name, section in values.items():
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{where} [{name}]: expected a mapping of fields, got {type(section).__name__} {section!r}")
    built = {name: _section(classes[name], dict(values.get(name) or {}), f"{where} [{name}]") for name in classes}
    return config_class(**built).check(where)


def load_config(path, overrides: list[str] | None = None, config_class=None):
    """A config from YAML, with `section.field=value` overrides (values parsed as YAML)."""
    path = Path(path)
    values = read_yaml(path, "config file (see configs/)") or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(values).__name__}")
    return from_dict(apply_overrides(values, overrides), str(path), config_class)


def apply_overrides(values: dict, overrides: list[str] | None) -> dict:
    """`section.field=value` items (values parsed as YAML) set into a mapping of sections."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.field=value (e.g. optim.lr=3e-4)")
        section, _, name = key.partition(".")
        if values.get(section) is None:  # absent, or an empty `section:` line in the YAML
            values[section] = {}
        target = values[section]
        if not isinstance(target, dict):
            raise ConfigError(f"--set {item!r}: [{section}] is {target!r} in the config, not a mapping of fields")
        *parents, leaf = name.split(".")
        for parent in parents:  # e.g. model.overrides.hidden_size=64
            target = target.setdefault(parent, {})
        target[leaf] = parse_yaml(raw, f"--set {item}")
    return values


def replace(config: PretrainConfig, **sections) -> PretrainConfig:
    """A copy with some fields of some sections changed: replace(c, trainer={"max_steps": 5})."""
    changed = {name: dataclasses.replace(getattr(config, name), **values) for name, values in sections.items()}
    return dataclasses.replace(config, **changed).check()
