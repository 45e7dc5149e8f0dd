"""Perturbation response, GEARS / scGPT style: from a control cell's tokens, with a flag on the
targeted genes (their token added when the cell does not express them), predict the
post-perturbation expression of every measured gene; works with all three families.

The head reads the flagged tokens' final hidden states (what the encoder makes of the
perturbed genes in this cell) and the cell embedding, and either mixes the training
perturbations' shifts by attention (retrieval) or scores each measured gene against its
pretrained gene embedding (bilinear); see PerturbationModel. An untrained head predicts the
training-mean baseline. Targets are pseudobulk means (the metrics score pseudobulk means); a
perturbation's prediction averages the predictions from many control cells.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers.utils import ModelOutput

from celltron.corpus.genes import map_genes
from celltron.errors import ConfigError, InputError
from celltron.finetune import perturbation_eval as pe
from celltron.finetune.adapt import InputFlags, base_of, count_trainable, load_encoder, resolve_model_folder
from celltron.finetune.config import HEADS
from celltron.finetune.data import check_vocabulary_coverage, load_model_tokenizer, read_configured_lab_data, tokenize_cells
from celltron.finetune.perturbation_eval import METRICS, baseline_report, evaluate, heldout_split, pseudobulk, simulation_split
from celltron.finetune.report import aggregate, plot_bars, results_table, save_figure, write_h5ad_atomically, write_metrics
from celltron.finetune.train import train_task_model
from celltron.io import write_text_atomically
from celltron.tokenizers.ragged import RaggedTokens
from celltron.tokenizers.vocab import GeneVocab

log = logging.getLogger(__name__)


@dataclass
class PerturbationOutput(ModelOutput):
    """loss: MSE on all genes plus the weighted MSE on DE genes (with targets).
    predicted: (batch, measured genes) predicted log-normalised expression."""

    loss: torch.Tensor | None = None
    predicted: torch.Tensor | None = None


class PerturbationModel(nn.Module):
    """A pretrained encoder with perturbation flags and a per-gene expression head.

    Heads (both start at the training-mean prediction):
    - retrieval: the predicted shift is an attention-weighted mix of the training
      perturbations' shifts; the query comes from the encoder's view of the flagged genes in
      the cell, the keys from the pretrained embeddings of each training perturbation's
      targets. A training example never attends to its own perturbation (leave-one-out), so
      the head learns what carries over to unseen perturbations instead of memorising.
    - bilinear: the training-mean shift plus q([h_targets, h_cell]) . K e_gene + b_gene per
      measured gene, from its pretrained gene embedding (free to memorise each training
      perturbation).

    Args:
        encoder: the pretrained model (any family, possibly wrapped by peft).
        gene_tokens: (measured genes,) token of each measured gene, -1 where it has none.
        control_mean: (measured genes,) mean log-normalised expression of control cells.
        train_shifts: (training perturbations, measured genes) mean shift of each from control.
        train_targets: token ids of each training perturbation's target genes.
        head: retrieval or bilinear.
        de_weight: loss weight of the DE genes' MSE beside the all-gene MSE.
    """

    def __init__(
        self,
        encoder: nn.Module,
        gene_tokens,
        control_mean,
        train_shifts,
        train_targets,
        head: str = "retrieval",
        de_weight: float = 1.0,
    ):
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"perturbation.head {head!r} is not one of {HEADS}")
        self.encoder, self.head, self.de_weight = encoder, head, de_weight
        hidden = self.config.hidden_size
        self.flag_embedding = nn.Embedding(2, hidden)
        nn.init.normal_(self.flag_embedding.weight, std=0.02)
        self.query = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        nn.init.zeros_(self.query[2].weight)  # uniform attention / no correction: the training mean
        nn.init.zeros_(self.query[2].bias)
        self.keys = nn.Linear(hidden, hidden, bias=False)
        self.gene_bias = nn.Parameter(torch.zeros(len(gene_tokens))) if head == "bilinear" else None
        width = max(len(t) for t in train_targets)
        padded = np.full((len(train_targets), width), -1, dtype=np.int64)
        for row, tokens in enumerate(train_targets):
            padded[row, : len(tokens)] = tokens
        self.register_buffer("gene_tokens", torch.as_tensor(np.asarray(gene_tokens), dtype=torch.long))
        self.register_buffer("train_targets", torch.as_tensor(padded))
        self.register_buffer("train_shifts", torch.as_tensor(np.asarray(train_shifts), dtype=torch.float32))
        self.register_buffer("control_mean", torch.as_tensor(np.asarray(control_mean), dtype=torch.float32))
        self.flags = InputFlags(encoder, self.flag_embedding)

    @property
    def config(self):
        return base_of(self.encoder).config

    def _embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pretrained input embeddings of `tokens` (-1: none, zero), averaged over the last axis when 2-D."""
        table = base_of(self.encoder).get_input_embeddings().weight
        known = (tokens >= 0).unsqueeze(-1).to(table.dtype)
        rows = table[tokens.clamp(min=0)] * known
        return rows.sum(-2) / known.sum(-2).clamp(min=1) if tokens.dim() == 2 else rows

    def _shift(self, query: torch.Tensor, perturbation: torch.Tensor | None) -> torch.Tensor:
        scale = math.sqrt(query.shape[-1])
        if self.head == "bilinear":
            gene_keys = self.keys(self._embed_tokens(self.gene_tokens))
            return self.train_shifts.mean(0) + (query @ gene_keys.T).float() / scale + self.gene_bias
        scores = (query @ self.keys(self._embed_tokens(self.train_targets)).T).float() / scale
        if perturbation is not None and len(self.train_shifts) > 1:
            own = perturbation.unsqueeze(-1) == torch.arange(len(self.train_shifts), device=scores.device)
            scores = scores.masked_fill(own, float("-inf"))
        return torch.softmax(scores, dim=-1) @ self.train_shifts

    def forward(
        self, input_ids, attention_mask, flags, values=None, perturbation=None, target=None, de_mask=None, **unused
    ) -> PerturbationOutput:
        """`perturbation`: index of each example's perturbation among the training ones (-1:
        not a training perturbation), so the retrieval head leaves it out."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "heads": False}
        if values is not None:
            inputs["values"] = values
        self.flags.flags = flags
        try:
            out = self.encoder(**inputs)
        finally:
            self.flags.flags = None
        hidden = out.last_hidden_state
        flagged = flags.unsqueeze(-1).to(hidden.dtype)
        targets = (hidden * flagged).sum(1) / flagged.sum(1).clamp(min=1)
        query = self.query(torch.cat([targets, out.cell_embedding], dim=-1))
        predicted = self.control_mean + self._shift(query, perturbation)
        loss = None
        if target is not None:
            error = (predicted - target.float()) ** 2
            loss = error.mean()
            if de_mask is not None and self.de_weight:
                mask = de_mask.float()
                loss = loss + self.de_weight * (error * mask).sum() / mask.sum().clamp(min=1)
        return PerturbationOutput(loss=loss, predicted=predicted)


# ---------------------------------------------------------------- inputs


def target_tokens(perturbations: list[str], vocab, species: str, source: str) -> dict[str, np.ndarray]:
    """Tokens of each perturbation's target genes; perturbations with a target the vocabulary
    has no token for are left out (and named in a warning)."""
    out, missing = {}, []
    for perturbation in perturbations:
        genes = perturbation.split("+")
        ids = map_genes(genes, species, source).ensembl_ids if genes else []
        tokens = vocab.lookup_genes(ids)
        if (tokens < 0).any() or any(i == "" for i in ids):
            missing.append(perturbation)
        else:
            out[perturbation] = tokens
    if missing:
        log.warning(
            "%s: %d perturbation(s) target genes without a token in the model's vocabulary and are left out: %s",
            source,
            len(missing),
            ", ".join(missing[:10]),
        )
    return out


def flag_targets(
    ids: np.ndarray, values: np.ndarray | None, targets: np.ndarray, specials: set, max_tokens: int | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """A cell's tokens with the perturbed genes flagged; a target the cell does not express is
    added (value 0) after its last gene token, dropping its lowest-ranked genes to stay within
    `max_tokens`."""
    ids = np.asarray(ids)
    absent = [t for t in targets if t not in set(ids.tolist())]
    end = len(ids)
    while end > 0 and int(ids[end - 1]) in specials:
        end -= 1  # keep trailing special tokens (eos) last
    if max_tokens is not None and len(ids) + len(absent) > max_tokens:
        drop = len(ids) + len(absent) - max_tokens
        keep = np.r_[np.arange(end - drop), np.arange(end, len(ids))]
        ids, values, end = ids[keep], (values[keep] if values is not None else None), end - drop
    added = np.asarray(absent, dtype=ids.dtype)
    ids = np.concatenate([ids[:end], added, ids[end:]])
    if values is not None:
        values = np.concatenate([values[:end], np.zeros(len(added), dtype=values.dtype), values[end:]])
    flags = np.isin(ids, targets).astype(np.int64)
    return ids, values, flags


class PerturbationPairs(Dataset):
    """(control cell, perturbation) examples: the control cell's tokens with the perturbation's
    targets flagged, and the perturbation's pseudobulk mean and DE genes as the target."""

    def __init__(
        self,
        control_tokens: RaggedTokens,
        pairs: np.ndarray,
        targets: list[np.ndarray],
        means: np.ndarray | None,
        de_masks: np.ndarray | None,
        specials: set,
        max_tokens: int | None,
    ):
        self.tokens, self.pairs, self.targets = control_tokens, pairs, targets
        self.means, self.de_masks, self.specials, self.max_tokens = means, de_masks, specials, max_tokens

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        cell, perturbation = (int(x) for x in self.pairs[i])
        values = self.tokens.cell_values(cell) if self.tokens.values is not None else None
        ids, values, flags = flag_targets(self.tokens[cell], values, self.targets[perturbation], self.specials, self.max_tokens)
        # training examples name their perturbation (the retrieval head leaves it out)
        example = {"input_ids": ids, "flags": flags, "perturbation": perturbation if self.means is not None else -1}
        if values is not None:
            example["values"] = values
        if self.means is not None:
            example["target"] = self.means[perturbation]
            example["de_mask"] = self.de_masks[perturbation]
        return example


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """Pad to the longest example; counts for throughput logging."""
    longest = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), longest), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), longest), dtype=torch.long),
        "flags": torch.zeros((len(examples), longest), dtype=torch.long),
    }
    if "values" in examples[0]:
        batch["values"] = torch.zeros((len(examples), longest), dtype=torch.float32)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        batch["input_ids"][row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        batch["attention_mask"][row, :n] = 1
        batch["flags"][row, :n] = torch.as_tensor(example["flags"])
        if "values" in batch:
            batch["values"][row, :n] = torch.as_tensor(example["values"], dtype=torch.float32)
    batch["perturbation"] = torch.as_tensor([e["perturbation"] for e in examples], dtype=torch.long)
    if "target" in examples[0]:
        batch["target"] = torch.as_tensor(np.stack([e["target"] for e in examples]), dtype=torch.float32)
        batch["de_mask"] = torch.as_tensor(np.stack([e["de_mask"] for e in examples]))
    batch["n_cells"] = torch.tensor(len(examples))
    batch["n_tokens"] = batch["attention_mask"].sum()
    return batch


def training_pairs(labels: np.ndarray, perturbations: list[str], n_controls: int, seed: int) -> np.ndarray:
    """One example per perturbed training cell, each with a random control cell (GEARS's pairing)."""
    rng = np.random.default_rng(seed)
    counts = [int((labels == p).sum()) for p in perturbations]
    which = np.repeat(np.arange(len(perturbations)), counts)
    return np.stack([rng.integers(0, n_controls, len(which)), which], axis=1)


@torch.no_grad()
def predict_means(
    model: PerturbationModel,
    control_tokens: RaggedTokens,
    cells: np.ndarray,
    targets: list[np.ndarray],
    specials: set,
    max_tokens: int | None,
    pad_id: int,
    batch_size: int,
) -> np.ndarray:
    """(perturbations, genes): each perturbation's prediction averaged over `cells` (control rows)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for index in range(len(targets)):
        pairs = np.stack([cells, np.full(len(cells), index)], axis=1)
        dataset = PerturbationPairs(control_tokens, pairs, targets, None, None, specials, max_tokens)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=lambda e: collate_pairs(e, pad_id))
        total = 0
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items() if k not in ("n_cells", "n_tokens")}
            total = total + model(**batch).predicted.double().sum(0)
        out.append((total / len(cells)).cpu().numpy())
    return np.stack(out)


def max_tokens_of(config) -> int | None:
    """Longest input the model takes (position embeddings), None where it has none (scGPT)."""
    return getattr(config, "max_position_embeddings", None) if getattr(config, "model_type", "") != "scgpt" else None


def specials_of(vocab) -> set:
    return {int(i) for i in vocab.special_ids()}


def model_folder_vocab(folder: Path):
    return GeneVocab.from_pretrained(folder)


# ---------------------------------------------------------------- the task


BASELINES = ("control_mean", "train_mean", "additive", "linear")


def make_split(config, perturbations: list[str], seed: int) -> dict:
    section = config.perturbation
    choose = simulation_split if section.split == "simulation" else heldout_split
    return choose(perturbations, section.test_fraction, seed)


def _screen(lab, section):
    """Pseudobulk means and DE genes of the lab data, per perturbation."""
    import anndata as ad
    import pandas as pd

    view = ad.AnnData(
        X=lab.counts,
        obs=lab.obs[[section.perturbation_key]].astype(str),
        var=pd.DataFrame(index=pd.Index(lab.gene_names.astype(str)).astype(object)),
    )
    return pseudobulk(view, section.perturbation_key, section.control, section.de_genes, str(lab.path))


class _Prepared:
    """Everything of one model and one lab dataset that every seed's run shares."""

    def __init__(self, config, folder: Path, lab, screen):
        section = config.perturbation
        self.folder = folder
        self.tokenizer = load_model_tokenizer(folder, lab)
        vocab = self.tokenizer.vocab
        check_vocabulary_coverage(lab, vocab)
        labels = lab.obs[section.perturbation_key].astype(str).to_numpy()
        self.labels = labels
        self.control_rows = np.flatnonzero(labels == section.control)
        self.control_tokens = tokenize_cells(lab, self.tokenizer, self.control_rows, seed=config.trainer.seed)
        self.gene_tokens = vocab.lookup_genes(lab.gene_ids)
        self.targets = target_tokens(screen.perturbations, vocab, lab.species, str(lab.path))
        self.specials, self.pad_id = specials_of(vocab), vocab.special_id("pad")


def _fine_tune(config, prepared: _Prepared, screen, split: dict, seed: int, out: Path, resume: str | None):
    """Train one seed's model; returns the model on the first process, None on the others."""
    import lightning.pytorch as pl

    section = config.perturbation
    train = [p for p in split["train"] if p in prepared.targets]
    pl.seed_everything(config.trainer.seed + seed, workers=True, verbose=False)
    encoder = load_encoder(prepared.folder, config.model)
    shifts = np.stack([screen.means[p] - screen.control_mean for p in train])
    model = PerturbationModel(
        encoder,
        prepared.gene_tokens,
        screen.control_mean,
        shifts,
        [prepared.targets[p] for p in train],
        section.head,
        section.de_weight,
    )
    trainable, total = count_trainable(model)
    log.info("fine-tuning %d of %d parameters", trainable, total)
    means = np.stack([screen.means[p] for p in train]).astype(np.float32)
    de_masks = np.zeros(means.shape, dtype=bool)
    for row, p in enumerate(train):
        de_masks[row, screen.de_genes[p]] = True
    pairs = training_pairs(prepared.labels, train, len(prepared.control_rows), seed)
    dataset = PerturbationPairs(
        prepared.control_tokens,
        pairs,
        [prepared.targets[p] for p in train],
        means,
        de_masks,
        prepared.specials,
        max_tokens_of(model.config),
    )
    pad_id = prepared.pad_id
    model, first = train_task_model(config, model, dataset, lambda e: collate_pairs(e, pad_id), out, seed, resume)
    return model if first else None


def _model_predictions(config, prepared: _Prepared, model, test: list[str], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = min(config.perturbation.eval_cells, len(prepared.control_rows))
    cells = np.sort(rng.choice(len(prepared.control_rows), n, replace=False))
    predicted = predict_means(
        model,
        prepared.control_tokens,
        cells,
        [prepared.targets[p] for p in test],
        prepared.specials,
        max_tokens_of(model.config),
        prepared.pad_id,
        config.data.batch_size,
    )
    return dict(zip(test, predicted))


def _write_config(config, out: Path) -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    out.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        import yaml

        write_text_atomically(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))


def run_perturbation(config, model: str | None, out, baselines_only: bool = False, resume: str | None = None) -> dict | None:
    """The perturbation task end to end: splits per seed, baselines, fine-tuning and
    evaluation, then metrics.json, predictions.h5ad, a printed table and plots under `out`.
    Returns the metrics (None on processes other than the first)."""
    out = Path(out)
    section = config.perturbation
    if not config.data.path:
        raise ConfigError("no lab data: pass --data LAB.h5ad (or set data.path in the config)")
    if model is None and not baselines_only:
        raise ConfigError("no model: pass --model DIR_OR_HUB_ID, or --baselines-only for the baselines alone")
    lab = read_configured_lab_data(config.data, [section.perturbation_key])
    screen = _screen(lab, section)
    prepared = None if baselines_only else _Prepared(config, resolve_model_folder(model), lab, screen)
    usable = sorted(prepared.targets) if prepared else screen.perturbations
    excluded = sorted(set(screen.perturbations) - set(usable))
    if len(usable) < 3:
        raise InputError(
            f"{lab.path}: {len(usable)} usable perturbation(s) in obs[{section.perturbation_key!r}]; "
            "a split needs at least 3 besides the control"
        )
    _write_config(config, out)  # only now: a run refused for its inputs leaves no --out behind

    splits, model_runs, baseline_runs, predictions, fell_back = {}, {}, {n: {} for n in BASELINES}, {}, {}
    first = True
    for seed in section.seeds:
        split = make_split(config, usable, seed)
        splits[seed] = split
        report = baseline_report(screen, split)
        fell_back[str(seed)] = report["linear"].pop("fell_back_to_train_mean")
        for name in BASELINES:
            baseline_runs[name][seed] = report[name]
        predictions[seed] = {name: _baseline_predictions(name, screen, split) for name in BASELINES}
        if prepared is None:
            continue
        trained = _fine_tune(config, prepared, screen, split, seed, out / f"seed{seed}", resume)
        if trained is None:
            first = False
            continue
        predicted = _model_predictions(config, prepared, trained, split["test"], seed)
        model_runs[seed] = evaluate(predicted, screen, split["test"])
        predictions[seed]["model"] = predicted
    if not first:
        return None
    metrics = {
        "task": "perturbation",
        "data": str(lab.path),
        "model_folder": str(prepared.folder) if prepared else None,
        "model": aggregate(model_runs, METRICS, "per_perturbation") if model_runs else None,
        "baselines": {name: aggregate(baseline_runs[name], METRICS, "per_perturbation") for name in BASELINES},
        "split": {
            "kind": section.split,
            "test_fraction": section.test_fraction,
            "per_seed": {str(s): v for s, v in splits.items()},
        },
        "seeds": list(section.seeds),
        "excluded_perturbations": excluded,
        "notes": {
            "linear": "perturbations whose targets are not measured genes have no expression-derived embedding; "
            "the linear baseline predicts the training mean for them (fell_back_to_train_mean)"
        },
    }
    metrics["baselines"]["linear"]["fell_back_to_train_mean"] = fell_back
    if section.split == "simulation":
        metrics["groups"] = _group_metrics(screen, splits, predictions)
    return write_results(out, metrics, screen, splits, predictions)


def _baseline_predictions(name: str, screen, split: dict) -> dict[str, np.ndarray]:
    train, test = split["train"], split["test"]
    if name == "linear":
        return pe.linear_baseline(screen, train, test)[0]
    return {"control_mean": pe.control_mean_baseline, "train_mean": pe.train_mean_baseline, "additive": pe.additive_baseline}[
        name
    ](screen, train, test)


def _group_metrics(screen, splits: dict, predictions: dict) -> dict:
    """Simulation split: each predictor's metrics per group (unseen_single, combo_seen0/1/2), over seeds."""
    groups = {}
    for group in ("unseen_single", "combo_seen0", "combo_seen1", "combo_seen2"):
        for name in ("model", *BASELINES):
            runs = {
                s: evaluate(predictions[s][name], screen, splits[s][group])
                for s in splits
                if splits[s][group] and name in predictions[s]
            }
            if runs:
                groups.setdefault(group, {})[name] = aggregate(runs, METRICS, "per_perturbation")
    return groups


def write_results(out: Path, metrics: dict, screen, splits: dict, predictions: dict) -> dict:
    """metrics.json, predictions.h5ad (one row per seed and held-out perturbation: the model's
    prediction in X, truth, control and each baseline as layers), the table and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out / "metrics.json", metrics)
    _write_predictions(out / "predictions.h5ad", screen, splits, predictions)
    plot_bars(
        metrics, "pearson_delta_de20", out / "pearson_delta_de20.png", "Pearson delta, top-20 DE genes (held-out perturbations)"
    )
    if metrics.get("model"):
        _plot_delta_scatter(out / "delta_scatter.png", screen, splits, predictions)
    print(results_table(metrics, METRICS, {"linear": "falls back to the training mean where no target is a measured gene"}))
    return metrics


def _write_predictions(path: Path, screen, splits: dict, predictions: dict) -> None:
    import anndata as ad
    import pandas as pd

    rows, obs = [], []
    for seed, split in splits.items():
        for p in split["test"]:
            group = next(
                (g for g in ("unseen_single", "combo_seen0", "combo_seen1", "combo_seen2") if p in split.get(g, [])), "test"
            )
            rows.append(p)
            obs.append({"perturbation": p, "seed": int(seed), "group": group})
    layers = {"truth": np.stack([screen.means[p] for p in rows]), "control_mean": np.tile(screen.control_mean, (len(rows), 1))}
    for name in BASELINES:
        layers[name] = np.stack([predictions[o["seed"]][name][o["perturbation"]] for o in obs])
    has_model = all("model" in predictions[s] for s in splits)
    X = np.stack([predictions[o["seed"]]["model"][o["perturbation"]] for o in obs]) if has_model else layers["truth"]
    adata = ad.AnnData(
        X=X.astype(np.float32),
        obs=pd.DataFrame(obs, index=[f"{o['seed']}:{o['perturbation']}" for o in obs]),
        var=pd.DataFrame(index=pd.Index(screen.genes.astype(str))),
        layers={k: v.astype(np.float32) for k, v in layers.items()},
    )
    adata.uns["X"] = "model prediction" if has_model else "truth (baselines only)"
    write_h5ad_atomically(adata, path)


def _plot_delta_scatter(png: Path, screen, splits: dict, predictions: dict) -> None:
    """Predicted against true change from control over each held-out perturbation's DE genes (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = next(iter(splits))
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    for p in splits[seed]["test"]:
        de = screen.de_genes[p]
        axes.scatter(
            screen.means[p][de] - screen.control_mean[de],
            predictions[seed]["model"][p][de] - screen.control_mean[de],
            s=10,
            label=p,
        )
    axes.axhline(0, color="#999", lw=0.5)
    axes.axvline(0, color="#999", lw=0.5)
    axes.set_xlabel("true change from control (DE genes)")
    axes.set_ylabel("predicted change")
    axes.set_title(f"held-out perturbations, seed {seed}")
    if len(splits[seed]["test"]) <= 10:
        axes.legend(fontsize=6)
    figure.tight_layout()
    save_figure(figure, png)
