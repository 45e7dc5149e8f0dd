"""Two processes on CPU (torchrun, gloo): DDP and DeepSpeed ZeRO-1 / 2 / 3 runs finish,
checkpoint, resume where they stopped with the uninterrupted losses, and export."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import celltron  # noqa: F401
from celltron.model_zoo.geneformer import GeneformerForMaskedLM
from tests.pretrain.conftest import CONFIGS

ROOT = Path(__file__).resolve().parents[2]
# celltron's trainer imports this test-only strategy class when the switch names it
DEEPSPEED_ON_CPU = {
    "CELLTRON_DEEPSPEED_CPU": "tests.deepspeed_cpu:CPUDeepSpeedStrategy",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}

pytestmark = pytest.mark.slow
STEPS = 6


def _torchrun(corpus, out, strategy: str, *sets: str, config: str = "geneformer_debug.yaml") -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **DEEPSPEED_ON_CPU}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "celltron.cli",
        "pretrain",
        str(CONFIGS / "pretrain" / config),
        "--corpus",
        str(corpus.location),
        "--out",
        str(out),
        "--devices",
        "2",
        "--strategy",
        strategy,
        "--max-steps",
        str(STEPS),
        "--resume",
        "auto",
        "--set",
        "trainer.accelerator=cpu",
        "--set",
        "trainer.log_every=1",
        "--set",
        "trainer.val_every=100",
        "--set",
        "trainer.checkpoint_every=100",
        "--set",
        "logging.progress_bar=false",
        "--set",
        "model.overrides.hidden_dropout_prob=0.0",
    ]
    for item in sets:
        command += ["--set", item]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def _losses(out) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader((out / "metrics.csv").open()) if r["loss"]]


@pytest.fixture(scope="module")
def ddp_run(demo_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _torchrun(demo_corpus, out, "ddp")
    return out


def test_ddp_stops_resumes_and_exports(demo_corpus, ddp_run, tmp_path):
    _torchrun(demo_corpus, tmp_path, "ddp", f"trainer.stop_at_step={STEPS // 2}")
    assert (tmp_path / "checkpoints" / f"step={STEPS // 2}.ckpt").is_file()
    assert not (tmp_path / "export").exists()
    _torchrun(demo_corpus, tmp_path, "ddp")
    assert _losses(tmp_path) == _losses(ddp_run)
    assert [step for step, _ in _losses(tmp_path)] == list(range(1, STEPS + 1))
    assert (tmp_path / "export" / "model.safetensors").exists()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_stops_resumes_and_exports(stage, demo_corpus, ddp_run, tmp_path):
    strategy = f"deepspeed_stage_{stage}"
    config = f"trainer.deepspeed_config={CONFIGS.parent / 'configs' / 'deepspeed' / f'zero{stage}.json'}"
    _torchrun(demo_corpus, tmp_path, strategy, config, f"trainer.stop_at_step={STEPS // 2}")
    stopped = tmp_path / "checkpoints" / f"step={STEPS // 2}.ckpt"
    assert (stopped / "latest").exists()  # a DeepSpeed checkpoint folder, complete
    _torchrun(demo_corpus, tmp_path, strategy, config)
    got, expected = _losses(tmp_path), _losses(ddp_run)
    assert [step for step, _ in got] == list(range(1, STEPS + 1))
    # the same optimisation as DDP, up to the order of floating-point reductions
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-5)
    rows = [r for r in csv.DictReader((tmp_path / "metrics.csv").open()) if r["loss"]]
    assert all(float(r["grad_norm"]) > 0 for r in rows)

    # ZeRO shards consolidated into the same weights the DDP run exported
    ours = GeneformerForMaskedLM.from_pretrained(tmp_path / "export").eval()
    theirs = GeneformerForMaskedLM.from_pretrained(ddp_run / "export").eval()
    ids = torch.randint(4, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-4)


def test_two_processes_resume_on_one(demo_corpus, tmp_path):
    """A DDP checkpoint of 2 processes continues in 1: the model, optimiser and schedule from the
    checkpoint, the data from the next epoch (with a warning)."""
    from celltron.pretrain.config import load_config, replace
    from celltron.pretrain.run import pretrain

    _torchrun(demo_corpus, tmp_path, "ddp", f"trainer.stop_at_step={STEPS // 2}")
    config = load_config(CONFIGS / "pretrain" / "geneformer_debug.yaml")
    config = replace(
        config,
        data={"corpus": str(demo_corpus.location)},
        logging={"progress_bar": False},
        trainer={"max_steps": STEPS, "log_every": 1, "val_every": 100, "checkpoint_every": 100, "accelerator": "cpu"},
        model={"overrides": {"hidden_dropout_prob": 0.0}},
    )
    with pytest.warns(UserWarning, match="data continues at the start of epoch 1"):
        result = pretrain(config, tmp_path, resume="auto")
    assert result.steps == STEPS and (tmp_path / "export" / "model.safetensors").exists()
    assert [step for step, _ in _losses(tmp_path)] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2"])
def test_two_nodes_on_one_machine_train_as_one_job(strategy, demo_corpus, ddp_run, tmp_path):
    """The two torchrun commands `celltron launch` writes for 2 nodes x 1 process, run side by
    side with a 127.0.0.1 rendezvous, form one job: the losses of a 2-process DDP run on one node."""
    import socket

    from celltron.launch import ClusterSpec
    from celltron.launch.commands import torchrun_command

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = ClusterSpec(
        backend="torchrun",
        nodes=2,
        gpus_per_node=1,
        hosts=["127.0.0.1", "127.0.0.1"],
        port=port,
        job_name="two-nodes",
        python=sys.executable,
    ).check()
    extra = [
        "--corpus",
        str(demo_corpus.location),
        "--strategy",
        strategy,
        "--max-steps",
        str(STEPS),
        "--set",
        "trainer.accelerator=cpu",
        "--set",
        "trainer.log_every=1",
        "--set",
        "trainer.val_every=100",
        "--set",
        "trainer.checkpoint_every=100",
        "--set",
        "logging.progress_bar=false",
        "--set",
        "model.overrides.hidden_dropout_prob=0.0",
    ]
    if strategy.startswith("deepspeed"):
        extra += ["--set", f"trainer.deepspeed_config={CONFIGS.parent / 'configs' / 'deepspeed' / 'zero2.json'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **DEEPSPEED_ON_CPU}
    nodes = [
        subprocess.Popen(
            torchrun_command(spec, CONFIGS / "pretrain" / "geneformer_debug.yaml", tmp_path, rank, extra),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    got, expected = _losses(tmp_path), _losses(ddp_run)
    assert [step for step, _ in got] == list(range(1, STEPS + 1))
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-5)
    assert (tmp_path / "export" / "model.safetensors").exists()


def test_a_lost_rank_stops_the_job_fast_and_a_relaunch_resumes(demo_corpus, tmp_path):
    """Kill one node's process mid-run: the other exits within seconds naming the lost rank;
    launching both nodes again resumes from the last checkpoint and ends with the parameters
    of an undisturbed run."""
    import signal
    import socket
    import time

    from celltron.launch import ClusterSpec
    from celltron.launch.commands import torchrun_command

    steps = 30
    extra = [
        "--corpus",
        str(demo_corpus.location),
        "--strategy",
        "ddp",
        "--max-steps",
        str(steps),
        "--set",
        "trainer.accelerator=cpu",
        "--set",
        "trainer.log_every=1",
        "--set",
        "trainer.val_every=1000",
        "--set",
        "trainer.checkpoint_every=3",
        "--set",
        "logging.progress_bar=false",
        "--set",
        "model.overrides.hidden_dropout_prob=0.0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    config = CONFIGS / "pretrain" / "geneformer_debug.yaml"

    def start_nodes(out):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        spec = ClusterSpec(
            backend="torchrun",
            nodes=2,
            gpus_per_node=1,
            hosts=["127.0.0.1"] * 2,
            port=port,
            job_name=f"fault-{port}",
            python=sys.executable,
        ).check()
        return [
            subprocess.Popen(
                torchrun_command(spec, config, out, rank, extra),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in range(2)
        ]

    undisturbed = start_nodes(tmp_path / "undisturbed")
    assert [n.wait(timeout=600) for n in undisturbed] == [0, 0]

    nodes = start_nodes(tmp_path / "run")
    deadline = time.time() + 300
    while not (tmp_path / "run" / "checkpoints" / "step=6.ckpt").exists():
        assert time.time() < deadline and nodes[0].poll() is None, "the run never reached its second checkpoint"
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(nodes[1].pid)], capture_output=True, text=True).stdout.split()
    killed_at = time.time()
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    survivor_log = nodes[0].communicate(timeout=120)[0]
    nodes[1].communicate(timeout=120)
    assert time.time() - killed_at < 60
    assert nodes[0].returncode != 0 and "lost rank(s) [1]" in survivor_log, survivor_log[-3000:]

    relaunched = start_nodes(tmp_path / "run")
    logs = [n.communicate(timeout=600)[0] for n in relaunched]
    assert [n.returncode for n in relaunched] == [0, 0], logs[0][-3000:]
    a = GeneformerForMaskedLM.from_pretrained(tmp_path / "run" / "export")
    b = GeneformerForMaskedLM.from_pretrained(tmp_path / "undisturbed" / "export")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), name


def test_a_paired_contrastive_run_on_two_processes(tmp_path):
    """RNA + proteins (TEA-seq, 300 cells) under DDP: each rank scores its cells against the
    other rank's too (the gathered loss equals the one-process loss: tests/model_zoo)."""
    from types import SimpleNamespace

    from celltron.corpus.build_multimodal import build_multimodal_corpus
    from celltron.corpus.options import BuildOptions
    from celltron.model_zoo.contrastive import DualEncoder
    from tests.conftest import shared_file
    from tests.corpus.test_modalities import TEASEQ_ADT, TEASEQ_RNA

    files = {"rna": shared_file(TEASEQ_RNA), "adt": shared_file(TEASEQ_ADT)}
    build_multimodal_corpus(None, tmp_path / "corpus", BuildOptions(progress=False, val_fraction=0.1), modalities=files)
    corpus = SimpleNamespace(location=tmp_path / "corpus")
    _torchrun(corpus, tmp_path / "run", "ddp", "data.batch_size=16", config="geneformer_citeseq_debug.yaml")
    rows = [r for r in csv.DictReader((tmp_path / "run" / "metrics.csv").open()) if r["contrastive_loss"]]
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert all(0 < float(r["contrastive_loss"]) < 10 for r in rows)
    assert DualEncoder.from_pretrained(tmp_path / "run" / "export" / "paired").modalities == ["rna", "adt"]
