"""Golden files: the sbatch scripts, torchrun lines and DeepSpeed hostfiles `celltron launch`
writes for 1, 2 and 16 nodes; and SLURM jobs whose shape disagrees with the run are refused.

Regenerate after a deliberate change: CELLTRON_UPDATE_GOLDEN=1 pytest tests/launch
"""

import os
from pathlib import Path

import pytest

from celltron.cli import main
from celltron.launch import ClusterSpec, deepspeed_command, hostfile, sbatch_script, torchrun_commands
from celltron.launch.cluster import quote
from celltron.training.environment import check_slurm_shape

GOLDEN = Path(__file__).parent / "golden"
CONFIG = "configs/pretrain/geneformer_104M.yaml"
OUT = "/shared/runs/gf"
EXTRA = ["--corpus", "s3://cells/corpus"]


def _spec(nodes: int, backend: str) -> ClusterSpec:
    return ClusterSpec(
        backend=backend,
        nodes=nodes,
        gpus_per_node=8,
        hosts=[f"gpu{i:03d}" for i in range(nodes)],
        partition="h100",
        account="lab",
        time="48:00:00",
        cpus_per_task=12,
        setup=["source /shared/venv/bin/activate"],
    ).check()


def _render(kind: str, nodes: int) -> str:
    if kind == "sbatch":
        return sbatch_script(_spec(nodes, "slurm"), CONFIG, OUT, EXTRA)
    if kind == "torchrun":
        return "\n".join(torchrun_commands(_spec(nodes, "torchrun"), CONFIG, OUT, EXTRA)) + "\n"
    spec = _spec(nodes, "deepspeed")
    return hostfile(spec) + quote(deepspeed_command(spec, CONFIG, OUT, f"{OUT}/launch/hostfile", EXTRA)) + "\n"


@pytest.mark.parametrize("nodes", [1, 2, 16])
@pytest.mark.parametrize("kind", ["sbatch", "torchrun", "deepspeed"])
def test_generated_files_match_the_golden_ones(kind, nodes):
    path = GOLDEN / f"{kind}_{nodes}_nodes.txt"
    text = _render(kind, nodes)
    if os.environ.get("CELLTRON_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_slurm_shape_mismatch_is_refused_with_the_fix():
    job = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "gf", "SLURM_NNODES": "2", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1"}
    with pytest.raises(ValueError, match=r"SLURM_NTASKS_PER_NODE=1 but --devices 8.*--ntasks-per-node"):
        check_slurm_shape(2, 8, job)
    with pytest.raises(ValueError, match="SLURM_NNODES=2 but --num-nodes 1"):
        check_slurm_shape(1, 1, job)
    check_slurm_shape(2, 8, {**job, "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8(x2)"})
    check_slurm_shape(1, 8, {})  # not in a SLURM job: nothing to check


def test_launch_dry_run_writes_and_prints(tmp_path, capsys):
    assert (
        main(
            [
                "launch",
                CONFIG,
                "--backend",
                "slurm",
                "--nodes",
                "2",
                "--gpus-per-node",
                "8",
                "--time",
                "01:00:00",
                "--out",
                str(tmp_path),
                "--dry-run",
                "--",
                "--corpus",
                "s3://cells/corpus",
            ]
        )
        == 0
    )
    script = (tmp_path / "launch" / "job.sbatch").read_text()
    assert "--ntasks-per-node=8" in script and "--corpus s3://cells/corpus" in script and "--num-nodes 2 --devices 8" in script
    assert f"sbatch {tmp_path}/launch/job.sbatch" in capsys.readouterr().out
    assert (
        main(
            [
                "launch",
                CONFIG,
                "--backend",
                "torchrun",
                "--nodes",
                "2",
                "--gpus-per-node",
                "8",
                "--out",
                str(tmp_path),
                "--dry-run",
            ]
        )
        == 2
    )
    assert "--hosts" in capsys.readouterr().err
