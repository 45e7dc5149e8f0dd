"""The training loop every fine-tuning task shares: pretraining's Lightning machinery (strategy,
precision, atomic checkpoints, signals, metrics.csv, loggers) over a task model and a map-style
dataset of examples."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from celltron.pretrain.module import PretrainModule
from celltron.pretrain.run import CHECKPOINT_DIR, build_trainer, fit, resolve_resume


class ExamplesDataModule(pl.LightningDataModule):
    """Shuffled batches of a task's examples; Lightning deals them to ranks under DDP."""

    def __init__(self, train: Dataset, collate: Callable, batch_size: int, num_workers: int, seed: int):
        super().__init__()
        self.train, self.collate, self.batch_size, self.num_workers, self.seed = train, collate, batch_size, num_workers, seed

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=generator, drop_last=len(self.train) > self.batch_size,
                          collate_fn=self.collate, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


def train_task_model(config, model: torch.nn.Module, train: Dataset, collate: Callable, out: Path, seed: int,
                     resume: str | None = None) -> tuple[torch.nn.Module, bool]:
    """Fine-tune `model` (whose forward returns `.loss`) on `train` as `config` says, writing the
    run (checkpoints, metrics.csv, logs) under `out`. Returns the trained model and whether
    this process is the first (the one that evaluates and writes results)."""
    out.mkdir(parents=True, exist_ok=True)
    model.train()  # from_pretrained leaves models in eval mode (no dropout)
    module = PretrainModule(model, config.optim, config.trainer.max_steps, offload_optimizer=config.trainer.strategy.endswith("offload"))
    data = ExamplesDataModule(train, collate, config.data.batch_size, config.data.num_workers, seed)
    trainer, signals = build_trainer(config, out, val_batches=0, use_distributed_sampler=True)
    fit(trainer, module, data, signals, resolve_resume(resume, out), out / CHECKPOINT_DIR)
    if signals.interrupted:
        raise KeyboardInterrupt(f"{out}: stopped by a signal at step {trainer.global_step}; continue with --resume auto")
    return module.model.cpu(), trainer.is_global_zero
