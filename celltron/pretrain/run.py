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
import os
import shutil
import signal
from pathlib import Path

import yaml

import celltron  # noqa: F401  (Auto-class registration)
from celltron.corpus.store import Corpus
from celltron.errors import CheckpointError, ConfigError
from celltron.inputs import MissingInputError, read_json
from celltron.io import check_output_folder, write_folder_atomically, write_text_atomically
from celltron.model_zoo import FAMILIES, build_model
from celltron.model_zoo.common import Layer as BertLayer
from celltron.model_zoo.registry import check_vocabulary, family_of, model_folder
from celltron.model_zoo.scgpt.modeling_scgpt import EncoderLayer as ScGPTLayer
from celltron.pretrain.callbacks import StopOnSignal, ThroughputAndMetrics
from celltron.pretrain.checkpoints import AtomicCheckpointIO, check_checkpoint, latest_checkpoint, model_state_from_checkpoint
from celltron.pretrain.config import PretrainConfig
from celltron.pretrain.data import PretrainDataModule, corpus_tokenizer
from celltron.pretrain.environment import check_slurm_shape, explain_lost_peer
from celltron.pretrain.module import PretrainModule

MODEL_DIR, CHECKPOINT_DIR, EXPORT_DIR = "model", "checkpoints", "export"


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
    vocab = tokenizer.vocab
    if init_from:
        check_vocabulary(
            model_folder(init_from),
            len(vocab),
            f"this run's {config.tokenizer.scheme} tokenizer of the corpus",
            "continue pretraining with the tokenizer scheme (tokenizer.scheme) and gene set the model was trained with",
        )
        return FAMILIES[config.model.family].model_class.from_pretrained(init_from).train()  # from_pretrained: eval mode
    overrides = dict(config.model.overrides)
    overrides.setdefault("pad_token_id", vocab.special_id("pad"))
    if config.model.family == "genecompass":
        species = sorted(role for role in vocab.specials if role not in ("pad", "mask", "cls", "eos"))
        overrides.setdefault("species_token_ids", [vocab.special_id(s) for s in species])
    if config.model.family != "scgpt":
        longest = getattr(tokenizer, "max_len", 2048) + 2
        size_positions = FAMILIES[config.model.family].sizes[config.model.size].get("max_position_embeddings", 512)
        overrides.setdefault("max_position_embeddings", max(size_positions, longest))
    return build_model(config.model.family, config.model.size, vocab_size=len(vocab), **overrides)


def _deepspeed_class(config: PretrainConfig):
    """Lightning's DeepSpeedStrategy; on CPU only the test subclass, and only when asked for."""
    import torch
    from lightning.pytorch.strategies import DeepSpeedStrategy

    on_cpu = config.trainer.accelerator == "cpu" or (config.trainer.accelerator == "auto" and not torch.cuda.is_available())
    if not on_cpu:
        return DeepSpeedStrategy
    from celltron.testing.deepspeed_cpu import SWITCH, CPUDeepSpeedStrategy  # imports deepspeed, an optional package

    if os.environ.get(SWITCH) != "1":
        raise ConfigError(
            f"trainer.strategy {config.trainer.strategy}: DeepSpeed needs CUDA GPUs; use ddp on CPU "
            f"(tests can run DeepSpeed on CPU with {SWITCH}=1)"
        )
    return CPUDeepSpeedStrategy


def _fsdp_strategy():
    """FSDP sharding each Transformer layer (the unit of all-gather), saving full checkpoints
    (one consolidated file, exportable like any other)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(auto_wrap_policy={BertLayer, ScGPTLayer}, state_dict_type="full")


def _strategy(config: PretrainConfig):
    name = config.trainer.strategy
    if name == "fsdp":
        return _fsdp_strategy()
    if not name.startswith("deepspeed"):
        return name
    DeepSpeedStrategy = _deepspeed_class(config)
    stage, offload = int(name.split("_")[2]), name.endswith("offload")
    if config.trainer.deepspeed_config:
        settings = read_json(
            config.trainer.deepspeed_config, "DeepSpeed config (trainer.deepspeed_config)", "see configs/deepspeed/"
        )
        zero = settings.get("zero_optimization", {})
        if zero.get("stage") != stage or ("offload_optimizer" in zero) != offload:
            raise ConfigError(
                f"{config.trainer.deepspeed_config}: zero_optimization (stage {zero.get('stage')}, "
                f"offload {'offload_optimizer' in zero}) does not match strategy {name}; use configs/deepspeed/zero{stage}"
                f"{'_offload' if offload else ''}.json"
            )
        # batches come from an iterable dataset; DeepSpeed only logs this figure
        settings.setdefault("train_micro_batch_size_per_gpu", config.data.batch_size)
        return DeepSpeedStrategy(config=settings)
    return DeepSpeedStrategy(
        stage=stage, offload_optimizer=offload, offload_parameters=offload, logging_batch_size_per_gpu=config.data.batch_size
    )


def _loggers(config: PretrainConfig, out: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(out, name="lightning_logs")]
    if config.logging.wandb:
        from lightning.pytorch.loggers import WandbLogger

        offline = not os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "offline"
        loggers.append(WandbLogger(project=config.logging.project, name=config.logging.name, save_dir=str(out), offline=offline))
    return loggers


def resolve_resume(resume: str | None, out: Path) -> Path | None:
    """The checkpoint to continue from: none, the newest intact one in `out` ('auto'; damaged
    ones skipped with a warning), or the one given, which must be intact (CheckpointError)."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        return latest_checkpoint(out / CHECKPOINT_DIR)
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(
            f"--resume {resume}: no such checkpoint; pass a step=N.ckpt file or DeepSpeed checkpoint folder, or 'auto'"
        )
    return check_checkpoint(path)


def build_trainer(
    config, out: Path, callbacks: list | None = None, *, val_batches: int | float, use_distributed_sampler: bool = False
):
    """The Lightning Trainer of a run, pretraining or fine-tuning (any config with `trainer`,
    `optim`, `logging` and `data.batch_size` sections): strategy and precision, a checkpoint every
    `checkpoint_every` steps written atomically, stop on signals, metrics.csv and the loggers.
    `callbacks`: extra Lightning callbacks, run before celltron's own. Returns the trainer and
    its StopOnSignal callback."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoints = out / CHECKPOINT_DIR
    signals = StopOnSignal(checkpoints, config.trainer.stop_at_step)
    every = ModelCheckpoint(
        dirpath=checkpoints,
        filename="step={step}",
        auto_insert_metric_name=False,
        every_n_train_steps=config.trainer.checkpoint_every,
        save_top_k=-1,
        save_last=False,
    )
    plugins = [] if config.trainer.strategy.startswith("deepspeed") else [AtomicCheckpointIO()]
    if "SLURM_JOB_ID" in os.environ:
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        # requeueing is the sbatch script's job (celltron launch); Lightning's own would race it
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = pl.Trainer(
        max_steps=config.trainer.max_steps,
        accelerator=config.trainer.accelerator,
        devices=config.trainer.devices,
        num_nodes=config.trainer.num_nodes,
        strategy=_strategy(config),
        precision=config.trainer.precision,
        deterministic=config.trainer.deterministic,
        val_check_interval=config.trainer.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=config.trainer.log_every,
        gradient_clip_val=config.optim.grad_clip or None,
        accumulate_grad_batches=config.optim.accumulate,
        default_root_dir=out,
        use_distributed_sampler=use_distributed_sampler,
        callbacks=[*(callbacks or []), every, ThroughputAndMetrics(out / "metrics.csv", config.trainer.log_every), signals],
        plugins=plugins or None,
        logger=_loggers(config, out),
        enable_progress_bar=config.logging.progress_bar,
        enable_model_summary=False,
    )
    return trainer, signals


def stop_reason(signals, trainer) -> str | None:
    """Why fit ended early: 'stop_at_step' (asked for by the config; the same on every rank),
    'signal' (SIGTERM / SIGUSR1 on some rank), or None when it ran to the end."""
    if not signals.interrupted:
        return None
    if signals.stop_at_step is not None and trainer.global_step >= signals.stop_at_step:
        return "stop_at_step"
    return "signal"


def fit(trainer, module, data, signals, ckpt_path: Path | None, checkpoints: Path) -> Path:
    """trainer.fit, turning a signal stop into a clean return, Ctrl-C back into a
    KeyboardInterrupt and a lost peer into a clear error; saves the final checkpoint (unless
    stopped) and returns its path."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except SIGTERMException:  # a SystemExit: caught before the Ctrl-C case below
        # Lightning's own SIGTERM handling ends fit with this exception; ours has already
        # saved a checkpoint at the end of the step, which makes it a clean stop
        if not signals.interrupted:
            raise
    except SystemExit:
        # Lightning answers Ctrl-C with its own shutdown and sys.exit(1); hand the CLI the
        # KeyboardInterrupt back so that it says so in one line and exits 130
        if not trainer.interrupted:
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignored Ctrl-C for its shutdown
        raise KeyboardInterrupt from None
    except Exception as error:  # a peer died: say which, instead of a transport error
        clearer = explain_lost_peer(error, trainer.global_step)
        if clearer is None:
            raise
        raise clearer from error
    final = checkpoints / f"step={trainer.global_step}.ckpt"
    if not signals.interrupted and not final.exists():
        trainer.save_checkpoint(final)
    return final


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
    model = build_model_for(config, tokenizer, init_from)
    if config.trainer.activation_checkpointing:
        model.activation_checkpointing_enable()
    # every process builds the same run; the first (rank from the launcher's environment) writes it
    if rank_zero_only.rank == 0:
        _write_run_files(out, config, init_from, model, tokenizer)

    data = PretrainDataModule(corpus, config.model.family, tokenizer, config.data, config.trainer.seed)
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


def _write_run_files(out: Path, config: PretrainConfig, init_from: str | None, model, tokenizer) -> None:
    """config.yaml, init_from.txt and model/ (the model's config and tokenizer, what export needs)."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    if init_from:  # the model card names it as the base model when it is a Hub id
        write_text_atomically(out / "init_from.txt", f"{init_from}\n")
    model.config.save_pretrained(out / MODEL_DIR)
    tokenizer.save_pretrained(out / MODEL_DIR)


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
    model_config = AutoConfig.from_pretrained(model_dir)
    family = family_of(model_config)
    if family.name == "geneformer":
        model_config = family.config_class.from_pretrained(model_dir)
    model = family.model_class(model_config)
    state = model_state_from_checkpoint(checkpoint)
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
            if item.name != "config.json":
                shutil.copy2(item, folder / item.name)

    return write_folder_atomically(out, fill, overwrite=overwrite, protected=protected, written_by="celltron export")


def plot_loss(metrics_csv, png) -> Path | None:
    """Training (and validation) loss against step, from metrics.csv."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(Path(metrics_csv).open()))
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r.get("loss")]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    if not train:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(*zip(*train), label="train loss")
    if val:
        axis.plot(*zip(*val), "o-", label="validation loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
    return Path(png)
