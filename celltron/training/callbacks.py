"""Callbacks of a pretraining run: throughput and `metrics.csv`, and checkpoint-and-stop on
SIGTERM / SIGUSR1 (what schedulers send before they end a job)."""

from __future__ import annotations

import csv
import signal
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from celltron.model_zoo.registry import flops_per_token

# dense bf16 peak of one device, FLOP/s, for model FLOP utilisation (NVIDIA data sheets)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
METRICS_FIELDS = [
    "step",
    "loss",
    "lr",
    "grad_norm",
    "cells_per_s",
    "tokens_per_s",
    "mfu",
    "data_wait",
    "val_loss",
    "val_masked_accuracy",
    # paired pretraining (multimodal.objective: contrastive)
    "contrastive_loss",
    "val_contrastive_loss",
    "val_contrastive_accuracy",
    # joint multi-modal tokens (multimodal.joint): each modality's hidden tokens or values
    *(
        f"val_masked_{score}_{m}"
        for score in ("accuracy", "accuracy_constant", "mse", "mse_cellmean")
        for m in ("rna", "adt", "atac")
    ),
    "val_masked_accuracy_constant",  # last: metrics.csv files written before it keep their columns
]


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


class ThroughputAndMetrics(pl.Callback):
    """Every `log_every` steps: cells/s and tokens/s (non-padding, all ranks), MFU on a known
    GPU, and `data_wait`, the share of the interval the training loop spent between batches
    (fetching the next one), logged to Lightning's loggers and appended (rank 0) to
    `metrics.csv` with the step's loss, learning rate and gradient norm. Validation results get
    rows of their own."""

    def __init__(self, path, log_every: int):
        self.path, self.log_every = Path(path), log_every
        self.peak = device_peak_flops()
        self._cells = self._tokens = self._waited = 0.0
        self._since = self._batch_end = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._since = time.perf_counter()
        if trainer.is_global_zero and not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerow(METRICS_FIELDS)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._batch_end is not None:
            self._waited += time.perf_counter() - self._batch_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batch_end = time.perf_counter()
        counts = pl_module.last_batch
        self._cells += counts.get("n_cells", 0.0)
        self._tokens += counts.get("n_tokens", 0.0)
        step = trainer.global_step
        if step % self.log_every or trainer.fit_loop._should_accumulate():
            return
        totals = trainer.strategy.reduce(torch.tensor([self._cells, self._tokens], device=pl_module.device), reduce_op="sum")
        elapsed = max(time.perf_counter() - self._since, 1e-9)
        cells_per_s, tokens_per_s = float(totals[0]) / elapsed, float(totals[1]) / elapsed
        row = {
            "step": step,
            "loss": float(outputs["loss"]),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "cells_per_s": cells_per_s,
            "tokens_per_s": tokens_per_s,
            "data_wait": self._waited / elapsed,
        }
        self._cells = self._tokens = self._waited = 0.0
        self._since = time.perf_counter()
        grad_norm = trainer.callback_metrics.get("train/grad_norm")
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is not None:  # ZeRO partitions the gradients; the engine knows their global norm
            grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        if "train/contrastive_loss" in trainer.callback_metrics:
            row["contrastive_loss"] = float(trainer.callback_metrics["train/contrastive_loss"])
        if self.peak and hasattr(pl_module.model, "config"):  # task models without a Transformer config: no MFU
            per_device = tokens_per_s / trainer.world_size
            row["mfu"] = flops_per_token(pl_module.model.config, int(counts.get("row_length", 1))) * per_device / self.peak
        for key in ("lr", "cells_per_s", "tokens_per_s", "mfu", "data_wait"):
            if key in row:
                pl_module.log(
                    f"train/{key}",
                    row[key],
                    on_step=True,
                    rank_zero_only=True,
                    prog_bar=key in ("cells_per_s", "tokens_per_s", "mfu"),
                )
        self._append(trainer, row)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        row = {"step": trainer.global_step}
        names = ("loss", "masked_accuracy", "masked_accuracy_constant", "contrastive_loss", "contrastive_accuracy")
        names += tuple(
            f"masked_{score}_{m}"
            for score in ("accuracy", "accuracy_constant", "mse", "mse_cellmean")
            for m in ("rna", "adt", "atac")
        )
        for name, key in ((f"val_{n}", f"val/{n}") for n in names):
            if key in metrics:
                row[name] = float(metrics[key])
        if len(row) > 1:
            self._append(trainer, row)

    def _append(self, trainer, row: dict) -> None:
        if not trainer.is_global_zero:
            return
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, METRICS_FIELDS).writerow(row)


class StopOnSignal(pl.Callback):
    """On SIGTERM or SIGUSR1 (any rank), or at `stop_at_step`, save a checkpoint after the
    current step and stop. Pretraining knows nothing of schedulers; launch scripts rely on this
    to requeue."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, checkpoint_dir, stop_at_step: int | None = None):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.stop_at_step = stop_at_step
        self.received: str | None = None
        self.interrupted = False
        self._previous = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            if hasattr(signal, name):
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        self.received = signal.Signals(number).name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop._should_accumulate():
            return
        due = self.stop_at_step is not None and trainer.global_step >= self.stop_at_step
        if trainer.strategy.reduce_boolean_decision(self.received is not None or due, all=False):
            trainer.save_checkpoint(self.checkpoint_dir / f"step={trainer.global_step}.ckpt")
            self.interrupted = True
            trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
