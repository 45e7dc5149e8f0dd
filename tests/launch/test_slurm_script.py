"""The sbatch path end to end with stand-ins for SLURM's commands: `celltron launch` submits with
sbatch and reports the job id; the script requeues a run that stopped cleanly before its end,
and neither a finished run nor a failed one."""

import os
import stat
import subprocess
import sys

import pytest

from celltron.cli import main
from celltron.launch import ClusterSpec, sbatch_script

CONFIG = "configs/pretrain/geneformer_debug.yaml"


def _stub(folder, name, body):
    path = folder / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def slurm_bin(tmp_path, monkeypatch):
    """sbatch, srun and scontrol that record their arguments in calls.log."""
    folder = tmp_path / "bin"
    folder.mkdir()
    log = tmp_path / "calls.log"
    _stub(folder, "sbatch", f'echo "sbatch $*" >> {log}; echo "Submitted batch job 4242"')
    _stub(folder, "scontrol", f'if [ "$1" = show ]; then echo node001; else echo "scontrol $*" >> {log}; fi')
    # srun runs the command it is given (the stand-in for every task), honouring SRUN_EXIT
    _stub(folder, "srun", f'echo "srun $*" >> {log}; shift; exit ${{SRUN_EXIT:-0}}')
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return log


def test_launch_submits_with_sbatch(tmp_path, slurm_bin, capsys):
    assert (
        main(["launch", CONFIG, "--backend", "slurm", "--nodes", "2", "--gpus-per-node", "4", "--out", str(tmp_path / "run")])
        == 0
    )
    assert "submitted SLURM job 4242" in capsys.readouterr().out
    assert f"sbatch {tmp_path}/run/launch/job.sbatch" in slurm_bin.read_text()


@pytest.mark.parametrize(
    "srun_exit, finished, requeued", [(0, False, True), (75, False, True), (0, True, False), (1, False, False)]
)
def test_script_requeues_only_a_clean_unfinished_stop(tmp_path, slurm_bin, srun_exit, finished, requeued):
    out = tmp_path / "run"
    (out / "export").mkdir(parents=True)
    if finished:
        (out / "export" / "config.json").write_text("{}")
    spec = ClusterSpec(backend="slurm", nodes=2, gpus_per_node=4, python=sys.executable).check()
    script = tmp_path / "job.sbatch"
    script.write_text(sbatch_script(spec, CONFIG, out))
    env = {
        **os.environ,
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[001-002]",
        "SLURM_CPUS_PER_TASK": "8",
        "SRUN_EXIT": str(srun_exit),
    }
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == srun_exit, done.stderr
    calls = slurm_bin.read_text()
    assert "srun --kill-on-bad-exit=1" in calls and "--num-nodes 2 --devices 4 --resume auto" in calls
    assert ("scontrol requeue 4242" in calls) == requeued
