"""Weak scaling on paper: step time of data-parallel pretraining on 8-GPU H100 nodes, split into
compute and gradient communication, from model size, ZeRO stage and stated bandwidths.

    python -m benchmarks.scaling            # prints the tables recorded in benchmarks/scaling.md

Model (weak scaling: the per-GPU batch is fixed, so compute per step is constant):
- compute = FLOPs per token (celltron.model_zoo.registry.flops_per_token) x tokens per GPU per
  step / (peak bf16 x MFU);
- communication per step, bf16 gradients of S bytes, NCCL's hierarchical all-reduce: a
  reduce-scatter and an all-gather inside the node over NVLink (2 x S x 7/8 at the NVLink bus
  bandwidth) and, across k nodes, an all-reduce of each GPU's 1/8 shard over its own
  InfiniBand rail (2 x S/8 x (k-1)/k at the per-rail bandwidth). ZeRO-2 moves the same bytes
  (reduce-scatter of gradients + all-gather of parameters); ZeRO-3 adds an all-gather of the
  parameters in the forward and again in the backward (x1.5);
- latency: every bucket pays NCCL's per-hop latency, 2 x 7 hops of ALPHA_NVLINK inside the node
  and 2 x log2(k) hops of ALPHA_IB across nodes (tree all-reduce);
- overlap: the gradient reduce-scatter runs while the backward pass (2/3 of compute) still
  runs and only its last bucket is exposed; ZeRO-2's all-gather of the updated parameters comes
  after the optimiser step and is fully exposed; ZeRO-3 prefetches its parameter all-gathers
  behind compute, and a third of them is assumed exposed (prefetch stalls at layer boundaries;
  `exposed` below);
- efficiency(k) = step(1 GPU, no communication) / step(k nodes).
"""

from __future__ import annotations

import math

from celltron.model_zoo import build_config
from celltron.model_zoo.registry import flops_per_token

PEAK_BF16 = 989e12  # H100 SXM dense bf16, FLOP/s
MFU = 0.45  # the goal for the packed ~100M geneformer
NVLINK_BUS = 350e9  # achievable NCCL bus bandwidth inside an H100 node (NVLink 4, 450 GB/s per direction)
RAIL = 40e9  # achievable per-GPU InfiniBand NDR bandwidth (400 Gb/s = 50 GB/s raw, ~80%)
GPUS_PER_NODE = 8
BUCKET = 50e6  # bytes per gradient bucket (bf16; 25 M elements)
ALPHA_NVLINK = 10e-6  # seconds per NVLink hop
ALPHA_IB = 20e-6  # seconds per InfiniBand hop
SEQ = 4096
TOKENS_PER_GPU = 4 * SEQ  # 4 packed rows of 4,096 tokens per GPU per step


def step_times(size: str, nodes: int, zero: int) -> dict:
    config = build_config("geneformer", size)
    params = sum_parameters(size)
    compute = flops_per_token(config, SEQ) * TOKENS_PER_GPU / (PEAK_BF16 * MFU)
    grad_bytes = 2.0 * params
    buckets = max(1.0, grad_bytes / BUCKET)

    def collective(nbytes: float) -> float:
        """One reduce-scatter or all-gather of `nbytes` over the whole job (half an all-reduce)."""
        intra = nbytes * (GPUS_PER_NODE - 1) / GPUS_PER_NODE / NVLINK_BUS
        inter = (nbytes / GPUS_PER_NODE) * (nodes - 1) / nodes / RAIL if nodes > 1 else 0.0
        hops = 7 * ALPHA_NVLINK + (max(1.0, math.log2(nodes)) * ALPHA_IB if nodes > 1 else 0.0)
        return intra + inter + buckets * hops

    reduce_scatter = collective(grad_bytes)
    all_gather = collective(grad_bytes)
    last_bucket = reduce_scatter / buckets
    if zero == 3:  # parameters gathered in the forward and again in the backward
        communication = reduce_scatter + 2 * all_gather
        exposed = last_bucket + 2 * all_gather / 3
    else:  # ZeRO-2 (DDP moves the same bytes as an all-reduce, overlapped)
        communication = reduce_scatter + all_gather
        exposed = max(reduce_scatter - 2 / 3 * compute, last_bucket) + all_gather
    return {"compute": compute, "communication": communication, "exposed": exposed, "step": compute + exposed}


def sum_parameters(size: str) -> int:
    import torch

    from celltron.model_zoo import build_model
    from celltron.model_zoo.registry import count_parameters

    with torch.device("meta"):
        return count_parameters(build_model("geneformer", size))


def main() -> None:
    for size, zero in (("104M", 2), ("1b", 2), ("1b", 3)):
        base = step_times(size, 1, zero)["compute"]
        print(f"\ngeneformer {size}, ZeRO-{zero}, {TOKENS_PER_GPU:,} tokens per GPU per step, MFU {MFU:.0%}")
        print(f"{'nodes':>6}{'GPUs':>6}{'compute ms':>12}{'comm ms':>10}{'exposed ms':>12}{'step ms':>10}{'efficiency':>12}")
        for nodes in (1, 2, 4, 8, 16, 32, 64):
            t = step_times(size, nodes, zero)
            print(
                f"{nodes:>6}{nodes * GPUS_PER_NODE:>6}{t['compute'] * 1e3:>12.1f}{t['communication'] * 1e3:>10.2f}"
                f"{t['exposed'] * 1e3:>12.2f}{t['step'] * 1e3:>10.1f}{base / t['step']:>12.1%}"
            )


if __name__ == "__main__":
    main()
