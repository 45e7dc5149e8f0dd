"""What a run prints: the frameworks' noise filtered out, and a progress bar that counts steps.

Lightning advertises its cloud products ("Tip: ... litlogger") and logs internal decisions
(`weights_only` defaults); DeepSpeed warns that it fell back to the CPU; torch and Lightning raise deprecation warnings about each other's
internals; transformers draws a bar for every one-file save and load. None of it is something a
celltron user can act on, so it is dropped; warnings raised by celltron's own code still show.
Streaming corpora have no epoch length, so Lightning's bar would read "Epoch 0/-2": ours shows
the run's max_steps instead.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

FRAMEWORKS = r"(lightning|lightning_fabric|torch|transformers|peft|deepspeed)(\.|$)"
_NOISE = ("💡 Tip:", "`weights_only` was not set")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISE)


def quiet_framework_noise() -> None:
    """Drop the frameworks' tips, internal notices and deprecation warnings (idempotent)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if not any(isinstance(f, _DropNoise) for f in target.filters):
                target.addFilter(_DropNoise())
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=FRAMEWORKS)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", module=FRAMEWORKS)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if "deepspeed" not in sys.modules and not torch.cuda.is_available():
        # accelerate imports DeepSpeed (when installed) to unwrap models on save; without CUDA it
        # falls back to its CPU accelerator with a warning: name that accelerator instead
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _without_version(metrics: dict) -> dict:
    metrics.pop("v_num", None)  # the logger's version number, meaningless beside a run directory
    return metrics


class RichStepBar(RichProgressBar):
    """Lightning's rich bar, described by the run's steps rather than by epoch (the bar itself
    counts the steps)."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"training, {self.trainer.max_steps} steps"

    def get_metrics(self, trainer, pl_module) -> dict:
        return _without_version(super().get_metrics(trainer, pl_module))


class TQDMStepBar(TQDMProgressBar):
    """Lightning's tqdm bar, described by step rather than by epoch."""

    def on_train_epoch_start(self, trainer, *_) -> None:
        super().on_train_epoch_start(trainer, *_)
        self.train_progress_bar.set_description(f"training to step {trainer.max_steps}")

    def get_metrics(self, trainer, pl_module) -> dict:
        return _without_version(super().get_metrics(trainer, pl_module))


def step_progress_bar():
    """The progress bar callback a run shows (rich when installed, as Lightning chooses)."""
    return RichStepBar() if _RICH_AVAILABLE else TQDMStepBar()
