"""Where a run goes: a typed cluster spec (configs/launch/*.yaml), and the `celltron pretrain`
command every process runs. Launch only writes and submits commands; pretraining owns the
environment checks and the signal handling."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from celltron.config import one_of, read_mapping, typed
from celltron.errors import ConfigError
from celltron.ranges import check_ranges, ranged

BACKENDS = ("torchrun", "slurm", "deepspeed")
SLURM_TIME = re.compile(r"^(\d+-)?\d+:[0-5]\d:[0-5]\d$")  # [D-]HH:MM:SS


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

    backend: str = one_of("torchrun", BACKENDS)
    nodes: int = ranged(1, ">= 1")
    gpus_per_node: int = ranged(1, ">= 1")
    hosts: list = field(default_factory=list)
    port: int = ranged(29500, "[1, 65535]")
    job_name: str = "celltron"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    constraint: str | None = None
    cpus_per_task: int = ranged(8, ">= 1")
    signal_seconds: int = ranged(300, ">= 0")
    requeue: bool = True
    setup: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    python: str = "python"

    def check(self, where: str = "cluster spec") -> ClusterSpec:
        """Refuse a spec no backend can run, naming `where` (the file, or flags), the field and the fix."""
        if self.backend not in BACKENDS:
            raise ConfigError(f"{where} backend: {self.backend!r} is not one of {BACKENDS}")
        check_ranges(self, where)
        if self.hosts and len(self.hosts) != self.nodes:
            raise ConfigError(f"{where} hosts: {len(self.hosts)} hosts given for {self.nodes} nodes; list one host per node")
        if self.time is not None and not SLURM_TIME.match(str(self.time)):
            raise ConfigError(
                f"{where} time: {self.time} is not a time limit; use 'HH:MM:SS', quoted in YAML (SLURM also takes D-HH:MM:SS)"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def load_cluster(path, **overrides) -> ClusterSpec:
    """A ClusterSpec from YAML; `overrides` (flags) that are not None win."""
    given = {k: v for k, v in overrides.items() if v is not None}
    values = read_mapping(path, "cluster spec (see configs/launch/)", "cluster fields") if path else {}
    where = _where(path, given)
    return typed(ClusterSpec, {**values, **given}, where).check(where)


def _where(path, flags: dict) -> str:
    """What an error names: the spec file and the flags that changed it."""
    given = ", ".join(f"--{name.replace('_', '-')}" for name in flags)
    if not path:
        return f"launch flags ({given})" if given else "default cluster spec"
    return f"{path} (with {given})" if given else str(path)


def pretrain_arguments(config, spec: ClusterSpec, out, extra: list[str] = ()) -> list[str]:
    """`celltron pretrain` arguments for every process of the job: its shape, and resume from
    the newest checkpoint in the shared run directory (a requeued or relaunched job continues)."""
    args = [
        "-m",
        "celltron.cli",
        "pretrain",
        str(config),
        "--out",
        str(out),
        "--num-nodes",
        str(spec.nodes),
        "--devices",
        str(spec.gpus_per_node),
        "--resume",
        "auto",
    ]
    return args + list(extra)


def quote(words) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)
