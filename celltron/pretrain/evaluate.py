"""Masked-token accuracy on the validation split, beside the most-frequent-token baseline."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import torch

from celltron.pretrain.data import PretrainDataModule
from celltron.training.module import split_batch


def _labels(batch: dict) -> torch.Tensor:
    return batch["labels"][batch["labels"] != -100]


def most_frequent_token(data: PretrainDataModule, train_batches: int = 50) -> int:
    """The token most often masked in the first `train_batches` training batches."""
    counts: Counter = Counter()
    for batch in islice(iter(data.train_dataloader()), train_batches):
        counts.update(_labels(batch).tolist())
    return counts.most_common(1)[0][0]


@torch.no_grad()
def masked_accuracy(model, data: PretrainDataModule, baseline_token: int | None = None) -> dict:
    """Accuracy of the model, and of always answering `baseline_token`, on the masked tokens of
    the validation split (the data module's val batches, all of them)."""
    model.eval()
    right = baseline_right = total = 0
    for batch in data.val_dataloader():
        labels = _labels(batch)
        inputs, _ = split_batch(batch)
        logits = model(**inputs, masked_logits_only=True).logits
        right += int((logits.argmax(-1) == labels).sum())
        if baseline_token is not None:
            baseline_right += int((labels == baseline_token).sum())
        total += len(labels)
    return {"accuracy": right / max(total, 1), "baseline_accuracy": baseline_right / max(total, 1), "masked_tokens": total}
