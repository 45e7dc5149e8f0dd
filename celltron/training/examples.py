"""The training loop every fine-tuning task shares: pretraining's Lightning machinery (strategy,
precision, atomic checkpoints, signals, metrics.csv, loggers) over a task model and a map-style
dataset of examples."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from celltron.errors import InputError
from celltron.training.module import PretrainModule
from celltron.training.trainer import CHECKPOINT_DIR, build_trainer, fit, resolve_resume, stop_reason


class RunStopped(Exception):
    """A signal (or trainer.stop_at_step) stopped fine-tuning after a checkpoint; --resume auto
    continues. `stopped_by`: 'signal' or 'stop_at_step' (see `celltron.training.trainer.stop_reason`)."""

    def __init__(self, message: str, stopped_by: str = "signal"):
        super().__init__(message)
        self.stopped_by = stopped_by


class ExampleOrder(Sampler):
    """Examples for one rank, epoch after epoch without end (runs are sized in steps): each
    epoch a permutation seeded by (seed, epoch), dealt to ranks in equal shares. Starting
    `skip` examples in continues a stopped run with the very batches it would have had."""

    def __init__(self, n: int, seed: int, rank: int, world: int, skip: int = 0):
        self.n, self.seed, self.rank, self.world, self.skip = n, seed, rank, world, skip

    def __iter__(self):
        share = self.n // self.world
        epoch, skip = divmod(self.skip, share)
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            yield from order[self.rank :: self.world][:share][skip:].tolist()
            epoch, skip = epoch + 1, 0


class ExamplesDataModule(pl.LightningDataModule):
    """Shuffled batches of a task's examples, dealt to ranks; its state (examples consumed per
    rank) travels in checkpoints so that a resumed run continues the same order."""

    def __init__(self, train: Dataset, collate: Callable, batch_size: int, num_workers: int, seed: int):
        super().__init__()
        self.train, self.collate, self.batch_size, self.num_workers, self.seed = train, collate, batch_size, num_workers, seed
        self.start = 0

    def train_dataloader(self) -> DataLoader:
        if len(self.train) < self.trainer.world_size:
            raise InputError(f"{len(self.train)} training examples cannot feed {self.trainer.world_size} processes")
        order = ExampleOrder(len(self.train), self.seed, self.trainer.global_rank, self.trainer.world_size, self.start)
        return DataLoader(
            self.train,
            batch_size=self.batch_size,
            sampler=order,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def state_dict(self) -> dict:
        # every rank consumes one batch per micro-step, so the trainer's step count says where we are
        return {"examples": self.trainer.global_step * self.trainer.accumulate_grad_batches * self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.start = int(state["examples"])


class PredictAtSteps(pl.Callback):
    """Calls `predict(model)` (in eval mode, without gradients) when training reaches each of
    `steps`, keeping the results by step: one run gives the model as it was after each training
    length, so a length can be chosen by cross-validation without a run per length (the learning-
    rate schedule is the full run's at every length, in the inner runs as in the outer one)."""

    def __init__(self, steps, predict: Callable[[torch.nn.Module], object]):
        super().__init__()
        self.steps, self.predict, self.predictions = set(steps), predict, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps taken; micro-batches of one step see it once first
        if step in self.steps and step not in self.predictions:
            model = module.model
            was_training = model.training
            model.eval()
            with torch.no_grad():
                self.predictions[step] = self.predict(model)
            model.train(was_training)


def train_task_model(
    config,
    model: torch.nn.Module,
    train: Dataset,
    collate: Callable,
    out: Path,
    seed: int,
    resume: str | None = None,
    callbacks: list | None = None,
) -> tuple[torch.nn.Module, bool]:
    """Fine-tune `model` (whose forward returns `.loss`) on `train` as `config` says, writing the
    run (checkpoints, metrics.csv, logs) under `out`; `callbacks`: extra Lightning callbacks (e.g.
    PredictAtSteps). Returns the trained model and whether this process is the first (the one
    that evaluates and writes results)."""
    ckpt_path = resolve_resume(resume, out)  # a damaged checkpoint is refused before `out` is written
    out.mkdir(parents=True, exist_ok=True)
    model.train()  # from_pretrained leaves models in eval mode (no dropout)
    module = PretrainModule(
        model, config.optim, config.trainer.max_steps, offload_optimizer=config.trainer.strategy.endswith("offload")
    )
    data = ExamplesDataModule(train, collate, config.data.batch_size, config.data.num_workers, seed)
    trainer, signals = build_trainer(config, out, callbacks, val_batches=0)
    fit(trainer, module, data, signals, ckpt_path, out / CHECKPOINT_DIR)
    stopped_by = stop_reason(signals, trainer)
    if stopped_by == "signal":
        raise RunStopped(f"{out}: stopped by a signal at step {trainer.global_step}; continue with --resume auto", stopped_by)
    if stopped_by:
        raise RunStopped(
            f"{out}: stopped at step {trainer.global_step} (trainer.stop_at_step); continue with --resume auto", stopped_by
        )
    return module.model.cpu(), trainer.is_global_zero
