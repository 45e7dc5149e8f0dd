"""The LightningModule of pretraining: one for every family, since each model computes its own
objective (masked genes for geneformer; masked expression + MVC, optionally generative, for
scgpt; masked ids + values for genecompass) from the collator's batch."""

from __future__ import annotations

import math
import random

import lightning.pytorch as pl
import numpy as np
import torch

from celltron.training.config import OptimSection

POSITION_KEY = "stream_position"  # (stream worker, epoch, offset of the round, batches of the round used)
BOOKKEEPING = (POSITION_KEY, "n_cells", "n_tokens", "max_seqlen")  # batch keys that are not model inputs


def split_batch(batch: dict) -> tuple[dict, dict]:
    """A batch's model inputs, and its bookkeeping (stream position, cell and token counts)."""
    inputs = {k: v for k, v in batch.items() if k not in BOOKKEEPING}
    return inputs, {k: v for k, v in batch.items() if k in BOOKKEEPING}


BATCH_COUNTS = ("n_cells", "n_tokens")


MODALITY_NAMES = ("rna", "adt", "atac")  # by modality id (tokenizers/multimodal.py MODALITY_IDS)


def commonest_share(targets: torch.Tensor) -> torch.Tensor:
    """The best any constant guess could score on `targets`, chosen with hindsight: the commonest
    hidden token's share."""
    return torch.unique(targets, return_counts=True)[1].max().float() / len(targets)


def per_modality_scores(batch: dict, out):
    """(metric key, value, tokens) per modality of a joint batch: masked-token accuracy where the
    family predicts hidden tokens (labels), beside the best constant guess's (the commonest
    hidden token's share), and masked-value MSE where it predicts hidden values
    (target_values beside a per-token `expression`), beside the MSE of guessing each hidden
    value as the mean of the cell's visible values of its modality (`masked_mse_cellmean_*`)."""
    modality = batch["modality_ids"]
    scores = []
    labels = batch.get("labels")
    if labels is not None and getattr(out, "logits", None) is not None:
        chosen = labels != -100
        hits = out.logits.argmax(-1) == labels[chosen]
        for index, name in enumerate(MODALITY_NAMES):
            of_modality = modality[chosen] == index
            if of_modality.any():
                count = int(of_modality.sum())
                scores.append((f"val/masked_accuracy_{name}", hits[of_modality].float().mean(), count))
                scores.append((f"val/masked_accuracy_constant_{name}", commonest_share(labels[chosen][of_modality]), count))
    target, predicted = batch.get("target_values"), getattr(out, "expression", None)
    if labels is None and target is not None and predicted is not None:
        target = target.float()
        hidden = (batch["values"] != batch["target_values"]) & batch["attention_mask"].bool()
        visible = batch["attention_mask"].bool() & ~hidden
        visible[:, 0] = False  # <cls>
        for index, name in enumerate(MODALITY_NAMES):
            of_modality = hidden & (modality == index)
            if not of_modality.any():
                continue
            error = (predicted[of_modality].float() - target[of_modality]).pow(2).mean()
            scores.append((f"val/masked_mse_{name}", error, int(of_modality.sum())))
            # what no model needs: each hidden value guessed as the mean of the cell's visible values of the modality
            seen = visible & (modality == index)
            cell_mean = (target * seen).sum(1) / seen.sum(1).clamp(min=1)
            guess = cell_mean[:, None].expand_as(target)[of_modality]
            scores.append(
                (f"val/masked_mse_cellmean_{name}", (guess - target[of_modality]).pow(2).mean(), int(of_modality.sum()))
            )
    return scores


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class PretrainModule(pl.LightningModule):
    """Wraps a celltron model; logs loss, learning rate, gradient norm and masked accuracy."""

    def __init__(self, model: torch.nn.Module, optim: OptimSection, max_steps: int, offload_optimizer: bool = False):
        super().__init__()
        self.model, self.optim, self.max_steps = model, optim, max_steps
        # ZeRO-Offload keeps optimiser states in CPU memory and steps them with DeepSpeed's CPU Adam
        self.offload_optimizer = offload_optimizer
        self.last_batch: dict = {}  # counts of the latest training batch, for throughput

    def forward(self, **batch):
        return self.model(**batch)

    def _split(self, batch: dict) -> tuple[dict, dict]:
        batch, extras = split_batch(batch)
        if "labels" in batch:  # vocabulary logits of the masked tokens only
            batch["masked_logits_only"] = True
        return batch, extras

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch, extras = self._split(batch)
        out = self.model(**batch)
        loss = out.loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=int(extras.get("n_cells", 1)))
        if getattr(out, "contrastive_loss", None) is not None:  # paired pretraining: its share of the loss
            self.log("train/contrastive_loss", out.contrastive_loss, on_step=True, batch_size=int(extras.get("n_cells", 1)))
        self.last_batch = {
            **{k: float(v) for k, v in extras.items() if k in BATCH_COUNTS},
            "row_length": batch["input_ids"].shape[1] if "input_ids" in batch else 1,
        }
        if POSITION_KEY in extras:
            self.trainer.datamodule.record(extras[POSITION_KEY])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        batch, extras = self._split(batch)
        out = self.model(**batch)
        n = int(extras.get("n_cells", 1))
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=n)
        if getattr(out, "contrastive_loss", None) is not None:
            self.log("val/contrastive_loss", out.contrastive_loss, sync_dist=True, batch_size=n)
            self.log("val/contrastive_accuracy", out.contrastive_accuracy, sync_dist=True, batch_size=n)
        labels = batch.get("labels")
        if labels is not None and out.logits is not None:
            targets = labels[labels != -100]
            if len(targets):
                accuracy = (out.logits.argmax(-1) == targets).float().mean()
                self.log("val/masked_accuracy", accuracy, sync_dist=True, batch_size=len(targets))
                # beside it, the best any constant guess could do (hindsight): a model at or below
                # this has learned the genes' frequencies and nothing of the cell
                self.log("val/masked_accuracy_constant", commonest_share(targets), sync_dist=True, batch_size=len(targets))
        if "modality_ids" in batch:  # joint multi-modal tokens: how each modality's hidden tokens are predicted
            for key, value, count in per_modality_scores(batch, out):
                self.log(key, value, sync_dist=True, batch_size=count)

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm(), on_step=True)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
        groups = [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(
                groups, lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps, adamw_mode=True
            )
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.optim.warmup_steps, self.max_steps, self.optim.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # RNG states travel with the checkpoint, so dropout after a resume draws what it would have.
    # They are put back when training starts, after everything that set-up may draw.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        name, keys, position, has_gauss, gauss = np.random.get_state()
        # tensors and plain numbers only, so that checkpoints load with torch.load(weights_only=True)
        numpy_state = {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restored_rng = checkpoint.get("rng")

    def on_train_start(self) -> None:
        rng, self._restored_rng = getattr(self, "_restored_rng", None), None
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        state = rng["numpy"]
        np.random.set_state(
            (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["gauss"])
        )
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
