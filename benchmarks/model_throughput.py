"""Forward + backward throughput of each model family, next to transformers' BertForMaskedLM.

    python -m benchmarks.model_throughput            # CPU: debug and ~100M sizes
    python -m benchmarks.model_throughput --device cuda --seq-len 2048   # bf16, padded vs packed, MFU

Tokens/s count real (non-padding) tokens. On CPU every family is compared, in the same run, with
`transformers.BertForMaskedLM` (SDPA attention) of the same shape on the same padded batch: the
ratio is ours / BERT. On CUDA each family runs padded and packed batches of the same cells in
bf16 autocast; model FLOP utilisation = FLOPs per token (the family's formula) x tokens/s /
the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import BertConfig, BertForMaskedLM

from celltron.model_zoo import build_config, build_model
from celltron.model_zoo.registry import flops_per_token
from celltron.tokenizers.collate import MLMCollator, PackingCollator, ValueMaskingCollator, pack_stream

# dense bf16 peak, FLOP/s (NVIDIA data sheets, SXM parts)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
SIZES_100M = {"geneformer": "104M", "scgpt": "whole-human", "genecompass": "small"}


def _cells(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    cells = []
    for length in rng.integers(min_len, max_len + 1, n):
        ids = np.concatenate([[2], rng.integers(6, vocab, int(length) - 1)])
        cells.append({"input_ids": ids, "values": rng.random(int(length)).astype(np.float32) * 4})
    return cells


def _collator(family: str, vocab: int):
    generator = torch.Generator().manual_seed(0)
    if family == "scgpt":
        return ValueMaskingCollator(0, mask_ratio=0.4, generator=generator)
    return MLMCollator(
        0, 1, [0, 1, 2, 3], vocab, probability=0.15, generator=generator, values_key="values" if family == "genecompass" else None
    )


def _to(batch: dict, device) -> dict:
    return {
        k: (v.to(device) if torch.is_tensor(v) else [t.to(device) for t in v] if isinstance(v, list) else v)
        for k, v in batch.items()
    }


def _time_steps(model, batches: list[dict], device, autocast_dtype, steps: int, warmup: int = 2) -> float:
    """Seconds per forward + backward, averaged over `steps` after `warmup`."""
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        batch = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def _bert_like(config) -> BertForMaskedLM:
    shape = BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=4096,
        hidden_act="relu",
        attn_implementation="sdpa",
    )
    return BertForMaskedLM(shape)


def _model(family: str, size: str, **overrides):
    """A freshly seeded model of (family, size) and its vocabulary size (2,000 at debug size)."""
    torch.manual_seed(0)
    vocab = build_config(family, size).vocab_size if size != "debug" else 2000
    return build_model(family, size, vocab_size=vocab, **overrides), vocab


def cpu_rows(families, sizes, batch_size: int, min_len: int, max_len: int, steps: int) -> list[dict]:
    device = torch.device("cpu")
    rows = []
    for family in families:
        for size in sizes(family):
            model, vocab = _model(family, size, attention_backend="sdpa")
            cells = _cells(batch_size * 4, min_len, max_len, vocab, seed=1)
            collate = _collator(family, vocab)
            batches = [collate(cells[i : i + batch_size]) for i in range(0, len(cells), batch_size)]
            real = np.mean([int(b["attention_mask"].sum()) for b in batches])
            ours = _time_steps(model, batches, device, None, steps)
            bert = _bert_like(model.config)
            bert_batches = [
                {
                    "input_ids": b["input_ids"],
                    "attention_mask": b["attention_mask"],
                    "labels": b.get("labels", torch.where(b["attention_mask"].bool(), b["input_ids"], -100)),
                }
                for b in batches
            ]
            theirs = _time_steps(bert, bert_batches, device, None, steps)
            rows.append(
                {"family": family, "size": size, "tokens/s": real / ours, "bert tokens/s": real / theirs, "ratio": theirs / ours}
            )
            del model, bert
    return rows


def cuda_rows(families, sizes, seq_len: int, batch_size: int, steps: int, peak: float) -> list[dict]:
    device = torch.device("cuda")
    rows = []
    for family in families:
        for size in sizes(family):
            # scGPT has no position table; the BERT-style families need one as long as a pack
            positions = {} if family == "scgpt" else {"max_position_embeddings": max(seq_len, 2048)}
            model, vocab = _model(family, size, **positions)
            model = model.to(device)
            cells = _cells(batch_size * 8, seq_len // 8, seq_len, vocab, seed=1)
            collate = _collator(family, vocab)
            padded = [_to(collate(cells[i : i + batch_size]), device) for i in range(0, len(cells), batch_size)]
            packs = list(pack_stream(iter(cells), seq_len))
            per_row = max(1, len(packs) // len(padded))
            packer = PackingCollator(seq_len, 0, _collator(family, vocab))
            packed = [_to(packer(packs[i : i + per_row]), device) for i in range(0, len(packs), per_row)]
            flops = flops_per_token(model.config, seq_len)
            for layout, batches in (("padded", padded), ("packed", packed)):
                real = np.mean([int(b["attention_mask"].sum()) for b in batches])
                seconds = _time_steps(model, batches, device, torch.bfloat16, steps)
                tokens = real / seconds
                rows.append({"family": family, "size": size, "layout": layout, "tokens/s": tokens, "MFU": flops * tokens / peak})
            del model
            torch.cuda.empty_cache()
    return rows


def _print(rows: list[dict]) -> None:
    keys = list(rows[0])
    print(" | ".join(f"{k:>14}" for k in keys))
    for row in rows:
        print(
            " | ".join(
                f"{v:>14,.2f}" if isinstance(v, float) and v < 10 else f"{v:>14,.0f}" if isinstance(v, float) else f"{v:>14}"
                for v in row.values()
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--families", nargs="*", default=["geneformer", "scgpt", "genecompass"])
    parser.add_argument("--sizes", nargs="*", default=None, help="default: debug and the ~100M size of each family")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="CPU: longest cell (default 256); CUDA: pack length (default 2048)"
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    sizes = (lambda family: args.sizes) if args.sizes else (lambda family: ["debug", SIZES_100M[family]])
    torch.set_num_threads(torch.get_num_threads())
    if args.device == "cpu":
        seq = args.seq_len or 256
        rows = cpu_rows(args.families, sizes, args.batch_size or 8, seq // 4, seq, args.steps)
    else:
        name = torch.cuda.get_device_name()
        peak = next((flops for key, flops in PEAK_BF16.items() if key in name), None)
        if peak is None:
            raise SystemExit(f"no bf16 peak known for {name}; add it to PEAK_BF16")
        rows = cuda_rows(args.families, sizes, args.seq_len or 2048, args.batch_size or 8, args.steps, peak)
        print(f"device: {name}, bf16 peak {peak / 1e12:.0f} TFLOP/s")
    _print(rows)


if __name__ == "__main__":
    main()
