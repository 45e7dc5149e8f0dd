"""A pretraining run from a config: corpus -> tokenizer -> model -> Lightning Trainer, then the
final checkpoint, a Hugging Face export and a loss curve.

The run directory (`out`) holds:
    config.yaml       the resolved config
    model/            the model's config.json and the tokenizer files (what export needs)
    metrics.csv       one row per logged step (and per validation)
    checkpoints/      step=N.ckpt (files, or folders for DeepSpeed), complete or absent; each
                      file with step=N.ckpt.integrity.json (its size and CRC-32)
    export/           the Hugging Face folder written at the end
    loss.png          the loss curve

Nothing is written there before the config, the corpus, the tokenizer, the model and the
checkpoint to resume from have been checked: a run refused for its inputs leaves no folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import yaml

import celltron  # noqa: F401  (Auto-class registration)
from celltron.corpus.store import Corpus
from celltron.errors import CheckpointError, ConfigError
from celltron.inputs import MissingInputError, read_json
from celltron.io import check_output_folder, write_folder_atomically, write_text_atomically
from celltron.model_zoo import FAMILIES, build_model
from celltron.model_zoo.contrastive import PAIR_TOKENS_FILE, PAIRED_DIR
from celltron.model_zoo.registry import check_vocabulary, family_of, model_folder
from celltron.pretrain.config import PretrainConfig
from celltron.pretrain.data import PretrainDataModule, check_gene_coverage, corpus_tokenizer
from celltron.pretrain.priors import MODEL_PRIORS_FILE, check_resumed_priors, describe_priors, load_priors
from celltron.pretrain.svd_init import initialise_gene_embeddings
from celltron.training.checkpoints import check_checkpoint, model_state_from_checkpoint
from celltron.training.environment import check_slurm_shape
from celltron.training.module import PretrainModule
from celltron.training.trainer import CHECKPOINT_DIR, build_trainer, fit, plot_loss, resolve_resume, stop_reason

MODEL_DIR, EXPORT_DIR = "model", "export"
PAIRING_FILE, PAIR_DIR = "pairing.json", "pair"  # paired pretraining (multimodal.pair)
PAIRED_EXPORT = PAIRED_DIR
log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    """stopped_by: why the run ended before max_steps ('signal': SIGTERM / SIGUSR1;
    'stop_at_step': trainer.stop_at_step), None when it ran to the end."""

    out: Path
    steps: int
    interrupted: bool
    checkpoint: Path | None
    export: Path | None
    loss_curve: Path | None
    is_global_zero: bool = True
    stopped_by: str | None = None


def build_model_for(config: PretrainConfig, tokenizer, init_from: str | None = None):
    """The run's model: a named size sized to the tokenizer's vocabulary, or `init_from` (an
    exported or converted folder) whose vocabulary must be the tokenizer's."""
    vocab, spec = tokenizer.vocab, FAMILIES[config.model.family]
    priors = _priors_for(config, vocab, init_from)
    if init_from:
        check_vocabulary(
            model_folder(init_from),
            len(vocab),
            f"this run's {config.tokenizer.scheme} tokenizer of the corpus",
            "continue pretraining with the tokenizer scheme (tokenizer.scheme) and gene set the model was trained with",
        )
        return spec.model_class.from_pretrained(init_from).train()  # from_pretrained: eval mode
    overrides = dict(config.model.overrides)
    overrides.setdefault("pad_token_id", vocab.special_id("pad"))
    if getattr(tokenizer, "n_modalities", 1) > 1:  # joint multi-modal tokens: a modality embedding per token
        overrides.setdefault("n_modalities", tokenizer.n_modalities)
    # the family's own defaults: e.g. a position table for the tokenizer's cells, species tokens
    for key, value in spec.build_defaults(tokenizer, spec.sizes[config.model.size]).items():
        overrides.setdefault(key, value)
    if priors:
        overrides["prior_dims"] = {name: matrix.shape[1] for name, matrix in priors.items()}
    model = build_model(config.model.family, config.model.size, vocab_size=len(vocab), **overrides)
    for name, matrix in priors.items():
        model.set_prior_knowledge(name, matrix)
    return model


def _priors_for(config: PretrainConfig, vocab, init_from: str | None) -> dict:
    """model.priors loaded and checked against the run's vocabulary (celltron.pretrain.priors.load_priors);
    refused for a family without priors, beside model.overrides.prior_dims, with --init-from
    (that model brings the priors it was pretrained with), or with joint multi-modal tokens
    (whose vocabulary adds protein or chromatin tokens that `celltron priors build` has no rows for)."""
    if not config.model.priors:
        return {}
    if config.multimodal.joint:
        raise ConfigError(
            "model.priors with multimodal.joint: the joint vocabulary adds protein or chromatin tokens that the priors "
            "have no rows for; pretrain on RNA alone with priors, or remove model.priors"
        )
    if config.model.family != "genecompass":
        raise ConfigError(
            f"model.priors: the {config.model.family} family takes no prior knowledge; use model.family: genecompass "
            "(tokenizer.scheme: ortholog), or remove model.priors"
        )
    if "prior_dims" in config.model.overrides:
        raise ConfigError("model.overrides.prior_dims and model.priors both set the priors: keep model.priors only")
    if init_from:
        raise ConfigError(
            "model.priors with --init-from: the model continues with the priors it was saved with; remove model.priors"
        )
    return load_priors(config.model.priors, vocab)


def pretrain(
    config: PretrainConfig, out, resume: str | None = None, init_from: str | None = None, callbacks: list | None = None
) -> RunResult:
    """Run (or continue, with resume='auto' or a checkpoint path) the pretraining `config`
    describes, writing everything under `out`. `callbacks`: extra Lightning callbacks, run
    before celltron's own."""
    import lightning.pytorch as pl
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    out = Path(out)
    if not config.data.corpus:
        raise ConfigError("no corpus: set data.corpus in the config or pass --corpus DIR_OR_URL")
    check_slurm_shape(config.trainer.num_nodes, config.trainer.devices)
    # the checkpoint to resume from and the export folder to replace are checked, and the
    # corpus, tokenizer and model built, before the run directory gets anything
    ckpt_path = resolve_resume(resume, out)
    check_output_folder(
        out / EXPORT_DIR,
        protected=[("the run directory", out)],
        flag="",
        fix="move it away or delete it (the run writes its export there), or choose another --out",
    )
    pl.seed_everything(config.trainer.seed, workers=True, verbose=False)

    corpus = Corpus(config.data.corpus, config.data.storage_options or None)
    tokenizer = corpus_tokenizer(corpus, config.tokenizer.scheme, config.tokenizer.max_len, config.trainer.seed)
    check_gene_coverage(corpus, tokenizer, config.tokenizer.scheme)
    if config.multimodal.joint:
        tokenizer = joint_tokenizer(config, corpus, tokenizer)
    model = build_model_for(config, tokenizer, init_from)
    if ckpt_path and config.model.priors:
        check_resumed_priors(config.model.priors, out / MODEL_DIR / MODEL_PRIORS_FILE)
    _initialise_gene_embeddings(config, corpus, tokenizer, model, ckpt_path, init_from)
    if config.trainer.activation_checkpointing:
        model.activation_checkpointing_enable()
    pair_tokens, pair_pad = None, 0.0
    if config.multimodal.pair:
        model, pair_tokens, pair_pad = paired_model(config, corpus, model)
    # every process builds the same run; the first (rank from the launcher's environment) writes it
    if rank_zero_only.rank == 0:
        _write_run_files(out, config, init_from, model, tokenizer, pair_tokens)

    data = PretrainDataModule(corpus, config.model.family, tokenizer, config.data, config.trainer.seed, pair_tokens, pair_pad)
    module = PretrainModule(
        model, config.optim, config.trainer.max_steps, offload_optimizer=config.trainer.strategy.endswith("offload")
    )
    trainer, signals = build_trainer(config, out, callbacks, val_batches=config.data.val_batches)
    final = fit(trainer, module, data, signals, ckpt_path, out / CHECKPOINT_DIR)
    export = loss_curve = None
    if not signals.interrupted and trainer.is_global_zero:
        export = export_checkpoint(final, out / EXPORT_DIR, run_dir=out)
        loss_curve = plot_loss(out / "metrics.csv", out / "loss.png")
    return RunResult(
        out,
        trainer.global_step,
        signals.interrupted,
        final if final.exists() else None,
        export,
        loss_curve,
        trainer.is_global_zero,
        stop_reason(signals, trainer),
    )


def joint_tokenizer(config: PretrainConfig, corpus: Corpus, rna_tokenizer):
    """multimodal.joint: the RNA tokenizer extended with the named modalities' tokens over the
    corpus's features; proteins in rank order for a family that reads no values."""
    from celltron.pretrain.config import adt_order
    from celltron.tokenizers.multimodal import MultiModalSettings, MultiModalTokenizer

    section = config.multimodal
    if not corpus.multimodal:
        raise ConfigError(
            f"multimodal.joint {list(section.joint)}: {corpus.location} is an RNA corpus; build one from paired data "
            "(celltron corpus build --modality rna=... --modality adt=...)"
        )
    settings = MultiModalSettings(
        adt_budget=section.adt_budget if "adt" in section.joint else 0,
        adt_bins=section.adt_bins,
        atac_budget=section.atac_budget if "atac" in section.joint else 0,
        atac_select=section.atac_select,
        adt_order=adt_order(config.model.family),
    )
    return MultiModalTokenizer.for_corpus(corpus, rna_tokenizer, settings, modalities=section.joint)


def paired_model(config: PretrainConfig, corpus: Corpus, rna_model):
    """Paired pretraining (multimodal.pair): the pair tower's tokens over the corpus's features, its
    model (multimodal.pair_family / pair_size), and both wrapped with the contrastive objective."""
    import torch

    from celltron.model_zoo.contrastive import PairedPretraining, freeze_unused
    from celltron.pretrain.config import adt_order
    from celltron.tokenizers.multimodal import PROTEIN_SPECIALS, PairTokens

    section = config.multimodal
    if not corpus.multimodal:
        raise ConfigError(
            f"multimodal.pair {section.pair}: {corpus.location} is an RNA corpus; build one from paired data "
            "(celltron corpus build --modality rna=... --modality adt=...)"
        )
    tokens = PairTokens.for_corpus(
        corpus, section.pair, section.adt_bins, section.atac_budget, section.atac_select, adt_order(section.pair_family)
    )
    # no dropout in the pair tower: its cells differ only in their values (a panel is the same
    # tokens for every cell), and dropout noise drowns that difference (CLIP trains without it)
    bert_style = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    dropout = {"scgpt": {"dropout": 0.0}, "genecompass": bert_style, "geneformer": bert_style}
    # mean pooling: every token's value counts from the start (a <cls> token learns to gather them only slowly)
    overrides = {"pad_token_id": PROTEIN_SPECIALS.index("<pad>"), "cell_embedding": "mean", **dropout[section.pair_family]}
    overrides |= section.pair_overrides
    longest = 1 + (tokens.n_features if section.pair == "adt" else section.atac_budget)
    if FAMILIES[section.pair_family].has_position_limit:
        overrides["max_position_embeddings"] = max(512, longest)
    pair_model = build_model(section.pair_family, section.pair_size, vocab_size=tokens.vocab_size, **overrides)
    probe = {
        "input_ids": torch.tensor([[1, 2, 3]]),
        "values": torch.ones(1, 3),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
    }
    freeze_unused(pair_model, probe)  # its heads: the pair tower only embeds cells
    if "masked" not in section.objective:  # contrastive alone: the RNA model's heads are unused too
        freeze_unused(rna_model, {**probe, "input_ids": probe["input_ids"] + 3})  # past its special tokens
    pad_value = float(getattr(pair_model.config, "pad_value", 0.0))
    wrapped = PairedPretraining(rna_model, section.pair, pair_model, section.projection_dim, section.objective, section.weights)
    return wrapped, tokens, pad_value


def _initialise_gene_embeddings(config: PretrainConfig, corpus: Corpus, tokenizer, model, ckpt_path, init_from) -> None:
    """model.init_gene_embeddings: svd, for a model that starts from its random initialisation.
    A resumed run's weights come from its checkpoint and an --init-from model's from its
    pretraining: neither is recomputed nor overwritten."""
    if config.model.init_gene_embeddings != "svd":
        return
    if ckpt_path or init_from:
        started = f"checkpoint {ckpt_path}" if ckpt_path else f"--init-from {init_from}"
        log.info("model.init_gene_embeddings svd: skipped, the gene embeddings come from the %s", started)
        return
    initialise_gene_embeddings(model, corpus, tokenizer.vocab, config.model.svd_cells)


def _write_run_files(out: Path, config: PretrainConfig, init_from: str | None, model, tokenizer, pair_tokens=None) -> None:
    """config.yaml, init_from.txt and model/ (the model's config and tokenizer, what export needs;
    model_priors.json for a run with model.priors)."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    if init_from:  # the model card names it as the base model when it is a Hub id
        write_text_atomically(out / "init_from.txt", f"{init_from}\n")
    model.config.save_pretrained(out / MODEL_DIR)
    tokenizer.save_pretrained(out / MODEL_DIR)
    if config.model.priors:  # which priors, with their sources: exports copy it
        write_text_atomically(out / MODEL_DIR / MODEL_PRIORS_FILE, json.dumps(describe_priors(config.model.priors), indent=1))
    pairing = getattr(model, "pair_modality", None)
    if pairing:  # what export needs to rebuild the paired model: the pair tower's config and the pairing
        model.dual.encoders[pairing].config.save_pretrained(out / MODEL_DIR / PAIR_DIR)
        write_text_atomically(out / MODEL_DIR / PAIRING_FILE, json.dumps(dataclasses.asdict(config.multimodal), indent=1))
        pair_tokens.save(out / MODEL_DIR / PAIR_DIR / PAIR_TOKENS_FILE)


def _paired_from_state(rna_model, model_dir: Path, state: dict):
    """The paired model of a run (its RNA model, pair tower and projections) with `state` loaded."""
    from transformers import AutoConfig

    from celltron.model_zoo.contrastive import PairedPretraining

    pairing = read_json(
        model_dir / PAIRING_FILE, "pairing of a paired pretraining run", "export from the run directory it came from"
    )
    pair_spec = family_of(AutoConfig.from_pretrained(model_dir / PAIR_DIR))
    pair_model = pair_spec.model_class(pair_spec.config_class.from_pretrained(model_dir / PAIR_DIR))
    paired = PairedPretraining(
        rna_model, pairing["pair"], pair_model, pairing["projection_dim"], pairing["objective"], pairing["weights"]
    )
    result = paired.load_state_dict(state, strict=False)
    tied = {f"dual.encoders.rna.{k}" for k in getattr(rna_model, "_tied_weights_keys", None) or {}}
    tied |= {f"dual.encoders.{pairing['pair']}.{k}" for k in getattr(pair_model, "_tied_weights_keys", None) or {}}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{model_dir}: the checkpoint's weights do not fit the paired model; missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return paired


def export_checkpoint(checkpoint, out, run_dir=None, overwrite: bool = False) -> Path:
    """A pretraining checkpoint (Lightning file or DeepSpeed folder, any ZeRO stage) -> a
    Hugging Face folder: config.json, model.safetensors, tokenizer files. An existing `out` is
    replaced only when celltron wrote it, or with `overwrite`; never when it is (or holds) the
    checkpoint, the run directory or its model folder."""
    from transformers import AutoConfig

    checkpoint = Path(checkpoint)
    run_dir = Path(run_dir) if run_dir else checkpoint.parent.parent
    model_dir = run_dir / MODEL_DIR
    protected = [("the checkpoint", checkpoint), ("the run directory", run_dir), ("the run's model folder", model_dir)]
    check_output_folder(out, overwrite=overwrite, protected=protected)  # before any loading: a refusal costs nothing
    if not checkpoint.exists():
        raise MissingInputError(f"{checkpoint}: no such checkpoint; pass a step=N.ckpt file or DeepSpeed checkpoint folder")
    if not (model_dir / "config.json").exists():
        raise MissingInputError(
            f"{model_dir / 'config.json'}: missing; export needs the run directory the checkpoint came from (--run-dir)"
        )
    check_checkpoint(checkpoint, checksum=True)  # a model published from damaged weights would fail far from here
    # AutoConfig names the family; its own config class reads the folder (plain `bert` folders
    # are Geneformer configs)
    family = family_of(AutoConfig.from_pretrained(model_dir))
    model = family.model_class(family.config_class.from_pretrained(model_dir))
    state = model_state_from_checkpoint(checkpoint)
    paired = None
    if (model_dir / PAIRING_FILE).exists():  # paired pretraining: the RNA tower is the export, the pair beside it
        paired = _paired_from_state(model, model_dir, state)
        state = paired.rna.state_dict()
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{checkpoint}: weights do not fit {model_dir}/config.json; missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        for item in model_dir.iterdir():
            if item.name not in ("config.json", PAIRING_FILE) and item.is_file():
                shutil.copy2(item, folder / item.name)
        if paired is not None:
            paired.dual.save_pretrained(folder / PAIRED_EXPORT)
            if (model_dir / PAIR_DIR / PAIR_TOKENS_FILE).exists():  # runs before this file existed lack it
                shutil.copy2(model_dir / PAIR_DIR / PAIR_TOKENS_FILE, folder / PAIRED_EXPORT / PAIR_TOKENS_FILE)

    return write_folder_atomically(out, fill, overwrite=overwrite, protected=protected, written_by="celltron export")
