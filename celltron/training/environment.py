"""Checks of the launch environment, made before anything starts: a job whose shape disagrees
with the run's (SLURM tasks vs devices) fails at once with the fix, instead of hanging."""

from __future__ import annotations

import os
import re

from celltron.errors import ConfigError


def _tasks_per_node(value: str) -> int:
    """SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE look like '4' or '4(x2)'."""
    match = re.match(r"(\d+)", value)
    return int(match.group(1)) if match else -1


def check_slurm_shape(num_nodes: int, devices, environ=None) -> None:
    """Inside a SLURM job step, the nodes and tasks per node must be the run's nodes and
    devices (Lightning waits forever for processes that never come otherwise)."""
    environ = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in environ or "SLURM_NTASKS" not in environ or environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return
    nodes = int(environ.get("SLURM_NNODES", environ.get("SLURM_JOB_NUM_NODES", "1")))
    per_node_raw = environ.get("SLURM_NTASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE", ""))
    per_node = _tasks_per_node(per_node_raw) if per_node_raw else int(environ["SLURM_NTASKS"]) // max(nodes, 1)
    problems = []
    if nodes != num_nodes:
        problems.append(f"SLURM_NNODES={nodes} but --num-nodes {num_nodes}")
    if isinstance(devices, int) and per_node != devices:
        problems.append(f"SLURM_NTASKS_PER_NODE={per_node_raw or per_node} but --devices {devices}")
    if isinstance(devices, int) and int(environ["SLURM_NTASKS"]) != num_nodes * devices:
        problems.append(
            f"SLURM_NTASKS={environ['SLURM_NTASKS']} but {num_nodes} nodes x {devices} devices = {num_nodes * devices}"
        )
    if problems:
        raise ConfigError(
            "this SLURM job does not have the run's shape: "
            + "; ".join(problems)
            + ". Submit with --nodes=N --ntasks-per-node=G --gpus-per-node=G and run pretrain with "
            "--num-nodes N --devices G (celltron launch --backend slurm writes such a script)"
        )


LOST_WAIT_SECONDS = 3.0


def lost_ranks(wait: float = LOST_WAIT_SECONDS) -> list[int] | None:
    """After a collective failed: the ranks that did not answer a roll call in the job's
    rendezvous store within `wait` seconds (each surviving rank answers). None when there is no
    process group or store to ask."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=wait))
        store.set(f"celltron/alive/{dist.get_rank()}", "1")
        time.sleep(wait)
        return [rank for rank in range(dist.get_world_size()) if not store.check([f"celltron/alive/{rank}"])]
    except Exception:  # the store itself may be gone with the lost node
        return None


def explain_lost_peer(error: BaseException, step: int) -> RuntimeError | None:
    """A clear error when a collective failed because another process died: which ranks are
    gone, and how to continue. None when `error` is something else."""
    text = str(error)
    signs = (
        "Connection closed by peer",
        "Connection reset by peer",
        "NCCL communicator was aborted",
        "Broken pipe",
        "ProcessGroupNCCL",
        "Timed out",
        "DistNetworkError",
        "DistBackendError",
    )
    if not any(sign in text or sign in type(error).__name__ for sign in signs):
        return None
    import torch.distributed as dist

    me = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    lost = lost_ranks()
    who = f"lost rank(s) {lost}" if lost else "lost another process of the job"
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return RuntimeError(
        f"rank {me}: {who} at step {step}; the job cannot continue ({first_line[:300]}). "
        "Relaunch the job: --resume auto continues from the newest checkpoint."
    )
