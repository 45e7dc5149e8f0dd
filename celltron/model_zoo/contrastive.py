"""A dual encoder for paired modalities (scCLIP's design, CLIP's loss): one encoder per modality,
each any family's model (its cell embedding, `heads=False`), a linear projection per modality onto
a shared space, and a symmetric InfoNCE loss over the cells of a batch with a learned temperature.

Cell i's RNA and its proteins (or chromatin) are a positive pair; every other cell of the batch is
a negative. Under DDP the projections of every rank are gathered (with their gradients, through
`torch.distributed.nn.functional.all_gather`), so each rank scores its cells against the whole
global batch: the loss equals the single-process loss on the concatenated batch.

Saved as one folder per modality (the encoder's own Hugging Face folder) plus `contrastive.pt`
(projections and temperature) and `contrastive.json` (modalities and sizes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HEAD_FILE = "contrastive.pt"
CONFIG_FILE = "contrastive.json"
INITIAL_TEMPERATURE = 0.07  # CLIP's
MAX_LOGIT_SCALE = 100.0  # CLIP clips the learned scale here to keep training stable


class DualEncoder(nn.Module):
    """Encoders {modality: model} projected to `projection_dim`, trained with `loss`."""

    def __init__(self, encoders: dict[str, nn.Module], projection_dim: int = 64):
        super().__init__()
        if len(encoders) != 2:
            raise ValueError(f"a dual encoder pairs two modalities, got {sorted(encoders)}")
        self.modalities = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.projections = nn.ModuleDict(
            {m: nn.Linear(model.config.hidden_size, projection_dim, bias=False) for m, model in encoders.items()}
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INITIAL_TEMPERATURE)))
        self.projection_dim = projection_dim

    def embed(self, modality: str, batch: dict) -> torch.Tensor:
        """L2-normalised projections (cells x projection_dim) of one modality's token batch."""
        cells = self.encoders[modality](**batch, heads=False).cell_embedding
        return F.normalize(self.projections[modality](cells), dim=-1)

    def forward(self, batches: dict[str, dict]) -> dict[str, torch.Tensor]:
        """{"loss", "logit_scale", "accuracy"} for a batch of paired cells ({modality: token batch},
        the same cells in the same order in each)."""
        first, second = (self.embed(m, batches[m]) for m in self.modalities)
        loss, accuracy = info_nce(first, second, self.logit_scale)
        return {"loss": loss, "accuracy": accuracy, "logit_scale": self.logit_scale.detach()}

    # ------------------------------------------------------------ saving

    def save_pretrained(self, directory) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for modality, model in self.encoders.items():
            model.save_pretrained(directory / modality)
        torch.save(
            {"projections": self.projections.state_dict(), "logit_scale": self.logit_scale.detach()}, directory / HEAD_FILE
        )
        (directory / CONFIG_FILE).write_text(json.dumps({"modalities": self.modalities, "projection_dim": self.projection_dim}))
        return directory

    @classmethod
    def from_pretrained(cls, directory) -> DualEncoder:
        from transformers import AutoConfig

        import celltron  # noqa: F401  (Auto classes)
        from celltron.model_zoo.registry import family_of

        directory = Path(directory)
        config = json.loads((directory / CONFIG_FILE).read_text())
        encoders = {}
        for modality in config["modalities"]:
            spec = family_of(AutoConfig.from_pretrained(directory / modality))
            encoders[modality] = spec.model_class.from_pretrained(directory / modality)
        model = cls(encoders, config["projection_dim"])
        head = torch.load(directory / HEAD_FILE, weights_only=True)
        model.projections.load_state_dict(head["projections"])
        with torch.no_grad():
            model.logit_scale.copy_(head["logit_scale"])
        return model


def gathered(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`x` of every rank stacked in rank order (gradients flow back to each rank's own rows), and
    where this rank's rows start; `x` itself outside a multi-process run."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    sizes = [p.shape[0] for p in parts]
    return torch.cat(parts), sum(sizes[: dist.get_rank()])


def info_nce(first: torch.Tensor, second: torch.Tensor, logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of paired, L2-normalised rows (cell i of `first` with cell i of
    `second`) against every cell of the global batch; returns the loss and the share of this
    rank's cells whose partner scores highest, both directions averaged."""
    all_second, offset = gathered(second)
    all_first, _ = gathered(first)
    scale = logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()
    targets = torch.arange(first.shape[0], device=first.device) + offset
    forward = scale * first @ all_second.T  # this rank's cells of `first` against every `second`
    backward = scale * second @ all_first.T
    loss = (F.cross_entropy(forward.float(), targets) + F.cross_entropy(backward.float(), targets)) / 2
    accuracy = ((forward.argmax(1) == targets).float().mean() + (backward.argmax(1) == targets).float().mean()) / 2
    return loss, accuracy.detach()
