"""The commands and files of each launch backend: torchrun lines per node, an sbatch script, a
DeepSpeed hostfile with its launcher line."""

from __future__ import annotations

from celltron.errors import ConfigError
from celltron.launch.cluster import ClusterSpec, pretrain_arguments, quote

# NCCL reports a lost peer as an error instead of waiting forever (a known way jobs hang)
NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN"}


def _host(spec: ClusterSpec) -> str:
    """The rendezvous / master host: the first listed, or this machine for a one-node job."""
    if spec.hosts:
        return spec.hosts[0]
    if spec.nodes == 1:
        return "127.0.0.1"
    raise ConfigError(
        f"a {spec.nodes}-node {spec.backend} launch needs the node host names: --hosts h1,h2,... (the first hosts the rendezvous)"
    )


def torchrun_command(spec: ClusterSpec, config, out, node_rank: int, extra=()) -> list[str]:
    """The torchrun command node `node_rank` runs: c10d rendezvous at the first host."""
    return [
        spec.python,
        "-m",
        "torch.distributed.run",
        f"--nnodes={spec.nodes}",
        f"--nproc-per-node={spec.gpus_per_node}",
        f"--node-rank={node_rank}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={_host(spec)}:{spec.port}",
        f"--rdzv-id={spec.job_name}",
        *pretrain_arguments(config, spec, out, extra),
    ]


def torchrun_commands(spec: ClusterSpec, config, out, extra=()) -> list[str]:
    """One shell line per node (`export`s of the spec's environment first)."""
    env = " ".join(f"{k}={v}" for k, v in {**NCCL_ENV, **spec.env}.items())
    return [f"{env} {quote(torchrun_command(spec, config, out, rank, extra))}" for rank in range(spec.nodes)]


def sbatch_script(spec: ClusterSpec, config, out, extra=()) -> str:
    """An sbatch script: one task per GPU, SIGUSR1 `signal_seconds` before the time limit (the
    run checkpoints and stops cleanly, exit code 75), then a requeue if it stopped cleanly
    without finishing (exit 0 or 75, no export yet). A run that failed is not requeued: its
    error is in the log."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={spec.job_name}",
        f"#SBATCH --nodes={spec.nodes}",
        f"#SBATCH --ntasks-per-node={spec.gpus_per_node}",
        f"#SBATCH --gpus-per-node={spec.gpus_per_node}",
        f"#SBATCH --cpus-per-task={spec.cpus_per_task}",
        f"#SBATCH --output={out}/slurm-%j.out",
    ]
    for name, value in (
        ("partition", spec.partition),
        ("account", spec.account),
        ("qos", spec.qos),
        ("time", spec.time),
        ("constraint", spec.constraint),
    ):
        if value:
            lines.append(f"#SBATCH --{name}={value}")
    if spec.requeue:
        lines += [f"#SBATCH --signal=USR1@{spec.signal_seconds}", "#SBATCH --requeue"]
    lines += ["", "set -euo pipefail", *spec.setup]
    environment = {**NCCL_ENV, **spec.env, "OMP_NUM_THREADS": "${SLURM_CPUS_PER_TASK}"}
    lines += [f"export {k}={v}" for k, v in environment.items()]
    lines += [
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT={spec.port}",
        "",
    ]
    # one srun task per GPU; Lightning reads SLURM's variables, pretraining checks they agree
    srun = ["srun", "--kill-on-bad-exit=1", spec.python, *pretrain_arguments(config, spec, out, extra)]
    lines.append(quote(srun) + " && status=0 || status=$?")
    if spec.requeue:
        lines += [
            f'if {{ [ "$status" -eq 0 ] || [ "$status" -eq 75 ]; }} && [ ! -f {quote([f"{out}/export/config.json"])} ]; then',
            '  echo "stopped before the end (time limit): requeueing job $SLURM_JOB_ID"',
            '  scontrol requeue "$SLURM_JOB_ID"',
            "fi",
        ]
    lines.append('exit "$status"')
    return "\n".join(lines) + "\n"


def hostfile(spec: ClusterSpec) -> str:
    if not spec.hosts:
        raise ConfigError("the deepspeed backend needs the node host names: --hosts h1,h2,... (or hosts: in the cluster spec)")
    return "".join(f"{host} slots={spec.gpus_per_node}\n" for host in spec.hosts)


def deepspeed_command(spec: ClusterSpec, config, out, hostfile_path, extra=()) -> list[str]:
    """The DeepSpeed launcher line (run once, on the first host; it reaches the others by ssh).
    `--no_local_rank`: processes read LOCAL_RANK from the environment, as under torchrun."""
    args = pretrain_arguments(config, spec, out, extra)[2:]  # ["pretrain", CONFIG, ...]: the launcher runs the module
    return [
        "deepspeed",
        f"--hostfile={hostfile_path}",
        f"--num_nodes={spec.nodes}",
        f"--num_gpus={spec.gpus_per_node}",
        f"--master_addr={_host(spec)}",
        f"--master_port={spec.port}",
        "--no_local_rank",
        "--module",
        "celltron.cli",
        *args,
    ]
