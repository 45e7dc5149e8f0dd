"""Where a run goes: a typed cluster spec (configs/launch/*.yaml), and the `celltron pretrain`
command every process runs. Launch only writes and submits commands; pretraining owns the
environment checks and the signal handling."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

BACKENDS = ("torchrun", "slurm", "deepspeed")


@dataclass
class ClusterSpec:
    """A cluster, as `celltron launch` needs it.

    backend: torchrun | slurm | deepspeed.
    nodes, gpus_per_node: the job's shape; every node runs gpus_per_node processes.
    hosts: node host names (torchrun: the first is the rendezvous host; deepspeed: the hostfile).
    port: rendezvous / master port. job_name: SLURM job name and torchrun rendezvous id.
    partition, account, qos, time, constraint: SLURM fields (time as HH:MM:SS).
    cpus_per_task: CPU cores per process (DataLoader workers + the training process).
    signal_seconds: SLURM sends SIGUSR1 this long before the time limit; pretraining then saves
        a checkpoint and exits, and the script requeues itself (`requeue`).
    setup: shell lines run on each node before the command (module load, activate a venv).
    env: extra environment variables for every process.
    python: the interpreter that runs celltron on the nodes.
    """

    backend: str = "torchrun"
    nodes: int = 1
    gpus_per_node: int = 1
    hosts: list = field(default_factory=list)
    port: int = 29500
    job_name: str = "celltron"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    constraint: str | None = None
    cpus_per_task: int = 8
    signal_seconds: int = 300
    requeue: bool = True
    setup: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    python: str = "python"

    def check(self) -> "ClusterSpec":
        if self.backend not in BACKENDS:
            raise ValueError(f"launch backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"nodes ({self.nodes}) and gpus_per_node ({self.gpus_per_node}) must be at least 1")
        if self.hosts and len(self.hosts) != self.nodes:
            raise ValueError(f"{len(self.hosts)} hosts given for {self.nodes} nodes; list one host per node")
        if self.time is not None and len(str(self.time).split(":")) != 3:
            raise ValueError(f"time {self.time!r}: use HH:MM:SS (SLURM also takes D-HH:MM:SS)")
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def load_cluster(path, **overrides) -> ClusterSpec:
    """A ClusterSpec from YAML; `overrides` (flags) that are not None win."""
    values = {}
    if path:
        values = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in fields(ClusterSpec)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {unknown}; known: {sorted(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ClusterSpec(**values).check()


def pretrain_arguments(config, spec: ClusterSpec, out, extra: list[str] = ()) -> list[str]:
    """`celltron pretrain` arguments for every process of the job: its shape, and resume from
    the newest checkpoint in the shared run directory (a requeued or relaunched job continues)."""
    args = ["-m", "celltron.cli", "pretrain", str(config), "--out", str(out), "--num-nodes", str(spec.nodes),
            "--devices", str(spec.gpus_per_node), "--resume", "auto"]
    return args + list(extra)


def quote(words) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)
