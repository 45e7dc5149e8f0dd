"""A dual encoder for paired modalities (scCLIP's design, CLIP's loss): one encoder per modality,
each any family's model (its cell embedding, `heads=False`), a projection head per modality onto
a shared space (SimCLR's: linear, batch norm, ReLU, linear), and a symmetric InfoNCE loss over
the cells of a batch with a learned temperature.

Cell i's RNA and its proteins (or chromatin) are a positive pair; every other cell of the batch is
a negative. Under DDP the projections of every rank are gathered (with their gradients, through
`torch.distributed.nn.functional.all_gather`), so each rank scores its cells against the whole
global batch: the loss equals the single-process loss on the concatenated batch.

Saved as one folder per modality (the encoder's own Hugging Face folder) plus `contrastive.pt`
(projections and temperature) and `contrastive.json` (modalities and sizes); a paired export also
holds `pair_tokens.json`, how the pair tower tokenises cells (tokenizers.multimodal.PairTokens).
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
PAIRED_DIR = "paired"  # where an RNA model's export keeps the dual encoder of its paired pretraining
PAIR_TOKENS_FILE = "pair_tokens.json"  # beside it: the pair tower's token settings and features
INITIAL_TEMPERATURE = 0.07  # CLIP's
MAX_LOGIT_SCALE = 100.0  # CLIP clips the learned scale here to keep training stable


class ProjectionHead(nn.Module):
    """SimCLR's projection head: Linear, BatchNorm, ReLU, Linear. The batch norm matters here: a
    Transformer's pooled cell embeddings share one dominant direction (pairwise cosine ~0.99 at
    initialisation), so without centring them every cell scores alike and the contrastive loss
    sits at log(batch) for hundreds of steps. A batch of one cell uses the running statistics."""

    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.first = nn.Linear(hidden, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.second = nn.Linear(hidden, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        if self.training and x.shape[0] < 2:
            n = self.norm
            x = F.batch_norm(x, n.running_mean, n.running_var, n.weight, n.bias, training=False, eps=n.eps)
        else:
            x = self.norm(x)
        return self.second(F.relu(x))


class DualEncoder(nn.Module):
    """Encoders {modality: model} projected to `projection_dim`, trained with `loss`."""

    def __init__(self, encoders: dict[str, nn.Module], projection_dim: int = 64):
        super().__init__()
        if len(encoders) != 2:
            raise ValueError(f"a dual encoder pairs two modalities, got {sorted(encoders)}")
        self.modalities = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.projections = nn.ModuleDict(
            {m: ProjectionHead(model.config.hidden_size, projection_dim) for m, model in encoders.items()}
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
    where this rank's rows start; `x` itself outside a multi-process run. Ranks may hold different
    numbers of rows (the last batch of a round is smaller): rows are padded for the exchange."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))]) if x.shape[0] < max(sizes) else x
    parts = all_gather(padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), sum(sizes[: dist.get_rank()])


def info_nce(
    first: torch.Tensor, second: torch.Tensor, logit_scale: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of paired, L2-normalised rows (cell i of `first` with cell i of
    `second`) against every cell of the global batch; returns the loss and the share of this
    rank's cells whose partner scores highest, both directions averaged. `valid` (bool per row):
    cells measured in both modalities; the others are neither scored nor negatives."""
    valid = torch.ones(first.shape[0], dtype=torch.bool, device=first.device) if valid is None else valid.bool()
    all_second, offset = gathered(second)
    all_first, _ = gathered(first)
    all_valid, _ = gathered(valid.to(first.dtype))
    scale = logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()
    targets = torch.arange(first.shape[0], device=first.device) + offset
    hidden = all_valid < 0.5  # columns of unmeasured cells
    forward = (scale * first @ all_second.T).float().masked_fill(hidden, float("-inf"))
    backward = (scale * second @ all_first.T).float().masked_fill(hidden, float("-inf"))
    if not valid.any():  # nothing to align on this rank: a zero that keeps the graph (DDP needs every parameter)
        zero = (first.sum() + second.sum()) * 0.0
        return zero, zero.detach()
    rows = valid.nonzero().squeeze(1)
    loss = (F.cross_entropy(forward[rows], targets[rows]) + F.cross_entropy(backward[rows], targets[rows])) / 2
    hits = (forward[rows].argmax(1) == targets[rows]).float().mean() + (backward[rows].argmax(1) == targets[rows]).float().mean()
    return loss, (hits / 2).detach()


class PairedPretraining(nn.Module):
    """Pretraining on paired cells: the RNA model's own (masked) objective and/or the dual
    encoder's contrastive loss between its cell embedding and the pair tower's, weighted.

    Batches are the RNA family's masked batches plus `pair_input_ids`, `pair_values`,
    `pair_attention_mask` (the pair tower's padded tokens, same cells in the same order) and
    `pair_measured`. The RNA cell embedding of the contrastive loss is the one of the masked
    forward pass (one pass serves both objectives, as in scGPT's multi-task pretraining).
    """

    def __init__(self, rna: nn.Module, pair_modality: str, pair: nn.Module, projection_dim: int, objectives, weights: dict):
        super().__init__()
        self.dual = DualEncoder({"rna": rna, pair_modality: pair}, projection_dim)
        self.pair_modality = pair_modality
        self.objectives, self.weights = tuple(objectives), dict(weights)
        self.config = rna.config  # what the trainer and callbacks read (FLOPs, sizes)

    @property
    def rna(self) -> nn.Module:
        return self.dual.encoders["rna"]

    def forward(self, **batch):
        pair = {k.removeprefix("pair_"): batch.pop(k) for k in list(batch) if k.startswith("pair_")}
        measured = pair.pop("measured")
        out = self.rna(**batch)
        total = self.weights.get("masked", 1.0) * out.loss if "masked" in self.objectives and out.loss is not None else 0.0
        if "contrastive" in self.objectives:
            rna_cells = F.normalize(self.dual.projections["rna"](out.cell_embedding), dim=-1)
            pair_cells = self.dual.embed(self.pair_modality, pair)
            contrastive, accuracy = info_nce(rna_cells, pair_cells, self.dual.logit_scale, measured)
            total = total + self.weights.get("contrastive", 1.0) * contrastive
            out.contrastive_loss, out.contrastive_accuracy = contrastive.detach(), accuracy
        out.loss = total
        return out


def freeze_unused(model: nn.Module, batch: dict) -> list[str]:
    """Stop training the parameters a tower's cell embedding does not use (its masked-token and
    classification heads, say): DDP refuses parameters that get no gradient, and they would only
    decay. Found with one forward/backward pass of `batch`; returns their names."""
    model.zero_grad(set_to_none=True)
    model(**batch, heads=False).cell_embedding.sum().backward()
    unused = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    for name, parameter in model.named_parameters():
        parameter.grad = None
        if name in unused:
            parameter.requires_grad_(False)
    return unused
