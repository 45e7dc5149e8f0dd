"""`celltron launch`: write a backend's files into the run directory, then print, run or submit."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from celltron.io import write_text_atomically
from celltron.launch.cluster import ClusterSpec, quote
from celltron.launch.commands import deepspeed_command, hostfile, sbatch_script, torchrun_command, torchrun_commands
from celltron.pretrain.config import load_config


def launch(spec: ClusterSpec, config, out, extra=(), dry_run: bool = False, node_rank: int | None = None) -> dict:
    """Returns what was written and run: {'files': [...], 'commands': [...], 'job_id': ...}.
    The pretraining config is loaded and checked first: a missing or broken one writes nothing."""
    check_run_config(config, extra)
    out = Path(out)
    folder = out / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    written: dict = {"files": [], "commands": [], "job_id": None}
    if spec.backend == "torchrun":
        written["commands"] = torchrun_commands(spec, config, out, extra)
        script = folder / "torchrun.sh"
        write_text_atomically(
            script, "# run line i on node i (node 0 first; it hosts the rendezvous)\n" + "\n".join(written["commands"]) + "\n"
        )
        written["files"].append(script)
        if node_rank is not None and not dry_run:
            subprocess.run(torchrun_command(spec, config, out, node_rank, extra), check=True)
    elif spec.backend == "slurm":
        script = folder / "job.sbatch"
        write_text_atomically(script, sbatch_script(spec, config, out, extra))
        written["files"].append(script)
        written["commands"] = [quote(["sbatch", str(script)])]
        if not dry_run:
            done = subprocess.run(["sbatch", str(script)], check=True, capture_output=True, text=True)
            match = re.search(r"(\d+)", done.stdout)
            written["job_id"] = match.group(1) if match else done.stdout.strip()
    else:
        hosts = folder / "hostfile"
        write_text_atomically(hosts, hostfile(spec))
        command = deepspeed_command(spec, config, out, hosts, extra)
        written["files"].append(hosts)
        written["commands"] = [quote(command)]
        if not dry_run:
            subprocess.run(command, check=True)
    return written


def check_run_config(config, extra=()) -> None:
    """Load `config` as every process of the job will (with the `--set` items passed on after
    `--`), so that a config that is missing, does not parse or is out of range is refused here,
    in one line, rather than by every node after the job was queued."""
    load_config(config, set_items(extra))


def set_items(extra) -> list[str]:
    """The `--set section.field=value` items among `celltron pretrain` arguments."""
    extra = list(extra)
    items = [value for flag, value in zip(extra, extra[1:]) if flag == "--set"]
    return items + [word.removeprefix("--set=") for word in extra if word.startswith("--set=")]
