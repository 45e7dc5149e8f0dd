"""CUDA paths: varlen attention for packed batches equals the masked SDPA path, in bf16."""

import numpy as np
import pytest
import torch

import celltron  # noqa: F401
from celltron.model_zoo import build_model
from celltron.model_zoo.common import _flash_attn_installed
from celltron.tokenizers.collate import PackingCollator, pack_stream

pytestmark = pytest.mark.gpu
VOCAB = 500


def _packed(device):
    rng = np.random.default_rng(0)
    cells = [
        {"input_ids": np.concatenate([[2], rng.integers(4, VOCAB, int(n))]), "values": rng.random(int(n) + 1).astype(np.float32)}
        for n in rng.integers(20, 300, 24)
    ]
    batch = PackingCollator(1024, 0)(list(pack_stream(iter(cells), 1024)))
    return {
        k: (v.to(device) if torch.is_tensor(v) else [t.to(device) for t in v] if isinstance(v, list) else v)
        for k, v in batch.items()
    }


BACKENDS = ["varlen"] + (["flash_attn"] if _flash_attn_installed() else [])


@pytest.mark.parametrize("family", ["geneformer", "scgpt", "genecompass"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_equals_masked_sdpa(family, backend):
    torch.manual_seed(0)
    model = build_model(family, "debug", vocab_size=VOCAB, attention_backend="sdpa").cuda().eval()
    batch = _packed("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        reference = model(**batch).cell_embedding.float()
        model.config.attention_backend = backend
        got = model(**batch).cell_embedding.float()
    assert torch.allclose(got, reference, atol=3e-2, rtol=3e-2)
