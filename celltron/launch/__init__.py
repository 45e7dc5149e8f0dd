"""Launching a pretraining run on many nodes: torchrun commands, SLURM sbatch scripts, DeepSpeed
hostfiles. Launch only writes (and submits) commands; every process runs `celltron pretrain`."""

from celltron.launch.cluster import ClusterSpec, load_cluster
from celltron.launch.commands import deepspeed_command, hostfile, sbatch_script, torchrun_commands
from celltron.launch.submit import launch

__all__ = ["ClusterSpec", "deepspeed_command", "hostfile", "launch", "load_cluster", "sbatch_script", "torchrun_commands"]
