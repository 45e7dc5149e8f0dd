"""The config sections every training run shares, pretraining and fine-tuning alike: the
optimiser and its schedule, the Trainer (strategy, precision, devices, checkpoints, stops) and
logging. Light (no torch): configs load on login nodes and for the CLI's --help."""

from __future__ import annotations

from dataclasses import dataclass

from celltron.config import one_of
from celltron.ranges import ranged

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload")
PRECISIONS = ("32", "bf16-mixed", "fp16-mixed", "32-true")


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
    strategy: str = one_of("auto", STRATEGIES)
    precision: str = one_of("32", PRECISIONS)
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
