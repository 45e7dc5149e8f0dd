"""The Lightning Trainer every celltron run uses, pretraining or fine-tuning: the strategy
(DDP, FSDP wrapping each family's Transformer layer, DeepSpeed ZeRO 1-3), precision, atomic
checkpoints every N steps, stop on signals, metrics.csv and the loggers; `fit` turns signal
stops, Ctrl-C and lost peers into clean outcomes; `resolve_resume` picks the checkpoint to continue from."""

from __future__ import annotations

import importlib
import os
import signal
from pathlib import Path

from celltron.errors import CheckpointError, ConfigError
from celltron.inputs import read_json
from celltron.io import write_file_atomically
from celltron.model_zoo.registry import layer_classes
from celltron.training.callbacks import StopOnSignal, ThroughputAndMetrics
from celltron.training.checkpoints import AtomicCheckpointIO, check_checkpoint, latest_checkpoint
from celltron.training.console import quiet_framework_noise, step_progress_bar
from celltron.training.environment import explain_lost_peer

CHECKPOINT_DIR = "checkpoints"
# "module:Class" of a DeepSpeedStrategy subclass that runs on CPU; only the test suite sets it
DEEPSPEED_CPU_SWITCH = "CELLTRON_DEEPSPEED_CPU"


def _deepspeed_class(config):
    """Lightning's DeepSpeedStrategy; on CPU only the test subclass, and only when asked for."""
    import torch
    from lightning.pytorch.strategies import DeepSpeedStrategy

    on_cpu = config.trainer.accelerator == "cpu" or (config.trainer.accelerator == "auto" and not torch.cuda.is_available())
    if not on_cpu:
        return DeepSpeedStrategy
    target = os.environ.get(DEEPSPEED_CPU_SWITCH)
    if not target:
        raise ConfigError(
            f"trainer.strategy {config.trainer.strategy}: DeepSpeed needs CUDA GPUs; use ddp on CPU "
            f"(the test suite runs DeepSpeed on CPU by naming its strategy class in {DEEPSPEED_CPU_SWITCH}=module:Class)"
        )
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _fsdp_strategy():
    """FSDP sharding each Transformer layer (the unit of all-gather; every registered family's
    layer_class), saving full checkpoints (one consolidated file, exportable like any other)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(auto_wrap_policy=layer_classes(), state_dict_type="full")


def _strategy(config):
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


def _loggers(config, out: Path) -> list:
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
    quiet_framework_noise()
    bar = [step_progress_bar()] if config.logging.progress_bar else []
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
        callbacks=[*(callbacks or []), every, ThroughputAndMetrics(out / "metrics.csv", config.trainer.log_every), signals, *bar],
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
    try:
        return write_file_atomically(png, lambda tmp: figure.savefig(tmp, dpi=100))
    finally:
        plt.close(figure)
