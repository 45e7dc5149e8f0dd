"""Pretraining throughput of the debug configs: cells/s, tokens/s (non-padding) and the share of
time the training loop waited for data.

    python -m benchmarks.pretrain_throughput                 # CPU: 1 process per family, 2 processes (DDP) for geneformer
    python -m benchmarks.pretrain_throughput --device cuda   # + bf16, padded vs packed, DDP vs ZeRO-2, MFU

The alternative a Geneformer user runs is Geneformer's own recipe: a pre-tokenised `datasets`
dataset fed to `transformers.Trainer` with `BertForMaskedLM`. The geneformer rows are compared
with that, in the same run, on the same cells and model shape (ratio = celltron / Trainer);
celltron's figure includes reading the corpus and tokenising on the fly.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
DEBUG = {"geneformer": "geneformer_debug.yaml", "scgpt": "scgpt_debug.yaml", "genecompass": "genecompass_debug.yaml"}


def _summary(run_dir: Path, skip_first: int) -> dict:
    """Mean of the logged intervals after the first `skip_first` (start-up) ones."""
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["loss"]][skip_first:]
    mean = lambda key: sum(float(r[key]) for r in rows) / len(rows) if rows and rows[0].get(key) else float("nan")  # noqa: E731
    return {"cells/s": mean("cells_per_s"), "tokens/s": mean("tokens_per_s"), "data wait": mean("data_wait"), "MFU": mean("mfu")}


def run_in_process(corpus: str, family: str, steps: int, sets: dict) -> dict:
    from celltron.pretrain.config import load_config, replace
    from celltron.pretrain.run import pretrain

    config = load_config(CONFIGS / DEBUG[family])
    changes = {
        "data": {"corpus": corpus},
        "logging": {"progress_bar": False, "wandb": False},
        "trainer": {"max_steps": steps, "log_every": max(steps // 10, 1), "val_every": 10**9, "checkpoint_every": 10**9},
    }
    for key, value in sets.items():
        section, field = key.split(".")
        changes.setdefault(section, {})[field] = value
    with tempfile.TemporaryDirectory() as out:
        pretrain(replace(config, **changes), out)
        return _summary(Path(out), skip_first=2)


def run_torchrun(corpus: str, family: str, steps: int, processes: int, strategy: str, sets: dict) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "celltron.cli",
            "pretrain",
            str(CONFIGS / DEBUG[family]),
            "--corpus",
            corpus,
            "--out",
            out,
            "--devices",
            str(processes),
            "--strategy",
            strategy,
            "--max-steps",
            str(steps),
            "--set",
            f"trainer.log_every={max(steps // 10, 1)}",
            "--set",
            "trainer.val_every=1000000000",
            "--set",
            "trainer.checkpoint_every=1000000000",
            "--set",
            "logging.progress_bar=false",
        ]
        for key, value in sets.items():
            command += ["--set", f"{key}={value}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes))}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"torchrun failed:\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}")
        return _summary(Path(out), skip_first=2)


def hf_trainer_baseline(corpus: str, steps: int, batch_size: int, max_len: int) -> dict:
    """Geneformer's recipe: tokenise to a datasets dataset, then transformers.Trainer + BertForMaskedLM."""
    from datasets import load_from_disk
    from transformers import BertForMaskedLM, Trainer, TrainingArguments

    from celltron.model_zoo import build_config
    from celltron.tokenizers.collate import MLMCollator
    from celltron.tokenizers.dataset import tokenize_to_dataset

    with tempfile.TemporaryDirectory() as work:
        tokenize_to_dataset(corpus, "geneformer-v2", Path(work) / "tokens", max_len=max_len, progress=False)
        dataset = load_from_disk(str(Path(work) / "tokens")).with_format(None)
        from celltron.tokenizers.vocab import GeneVocab

        vocab = GeneVocab.from_geneformer("v2")
        collate = MLMCollator(vocab.special_id("pad"), vocab.special_id("mask"), vocab.special_ids(), len(vocab), 0.15)
        config = build_config("geneformer", "debug", vocab_size=len(vocab), pad_token_id=vocab.special_id("pad"))
        model = BertForMaskedLM(config)
        tokens = {"n": 0}

        def data_collator(rows):
            batch = collate([{"input_ids": row["input_ids"]} for row in rows])
            tokens["n"] += int(batch["attention_mask"].sum())
            return batch

        args = TrainingArguments(
            output_dir=work,
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            learning_rate=5e-3,
            warmup_steps=steps // 10,
            logging_steps=10**9,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            train_sampling_strategy="group_by_length",
            length_column_name="length",
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=data_collator)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        return {
            "cells/s": steps * batch_size / seconds,
            "tokens/s": tokens["n"] / seconds,
            "data wait": float("nan"),
            "MFU": float("nan"),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--corpus", help="default: the bundled PBMC 3k demo corpus (built in a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        corpus = args.corpus
        if corpus is None:
            from celltron.corpus.demo import build_demo_corpus

            corpus = str(build_demo_corpus(Path(work) / "corpus", progress=False).location)
        rows = []
        accel = {"trainer.accelerator": args.device}
        for family in DEBUG:
            rows.append((family, "1 process", run_in_process(corpus, family, args.steps, accel)))
        baseline = hf_trainer_baseline(corpus, args.steps, batch_size=16, max_len=256)
        rows.append(("geneformer", "transformers.Trainer", baseline))
        if args.device == "cpu":
            rows.append(("geneformer", "2 processes, DDP", run_torchrun(corpus, "geneformer", args.steps, 2, "ddp", accel)))
        else:
            for label, sets in (
                ("bf16 padded", {"trainer.precision": "bf16-mixed"}),
                (
                    "bf16 packed",
                    {"trainer.precision": "bf16-mixed", "data.packing": True, "data.max_tokens": 2048, "data.batch_size": 4},
                ),
            ):
                rows.append(("geneformer", label, run_in_process(corpus, "geneformer", args.steps, {**accel, **sets})))
            n = torch.cuda.device_count()
            if n > 1:
                for strategy in ("ddp", "deepspeed_stage_2"):
                    rows.append(
                        (
                            "geneformer",
                            f"{n} GPUs {strategy}",
                            run_torchrun(corpus, "geneformer", args.steps, n, strategy, {"trainer.precision": "bf16-mixed"}),
                        )
                    )
    print(f"{'family':<12}{'run':<24}{'cells/s':>10}{'tokens/s':>11}{'data wait':>11}{'MFU':>8}{'vs Trainer':>12}")
    for family, label, r in rows:
        ratio = r["tokens/s"] / baseline["tokens/s"] if family == "geneformer" else float("nan")
        print(
            f"{family:<12}{label:<24}{r['cells/s']:>10,.0f}{r['tokens/s']:>11,.0f}{r['data wait']:>11.1%}{r['MFU']:>8.1%}{ratio:>12.2f}"
        )


if __name__ == "__main__":
    main()
