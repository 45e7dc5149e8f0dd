"""The varlen glue (flat cu_seqlens, reshapes) on CPU: with PyTorch's CUDA-only kernel replaced
by a per-segment reference, packed batches give the masked-SDPA outputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import celltron  # noqa: F401
from celltron.model_zoo import build_model
from celltron.tokenizers.collate import PackingCollator, pack_stream

VOCAB = 100


def _reference_varlen(query, key, value, cu_q, cu_k, max_q, max_k, **unused):
    """(tokens, heads, dim) attention within each [cu[i], cu[i+1]) segment."""
    assert max_q == int(torch.diff(cu_q).max())
    out = torch.empty_like(query)
    for lo, hi in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        q, k, v = (x[lo:hi].transpose(0, 1) for x in (query, key, value))
        out[lo:hi] = F.scaled_dot_product_attention(q, k, v).transpose(0, 1)
    return out


@pytest.mark.parametrize("family", ["geneformer", "scgpt", "genecompass"])
def test_varlen_path_matches_the_masked_path(family, monkeypatch):
    import torch.nn.attention.varlen as varlen

    rng = np.random.default_rng(0)
    cells = [
        {"input_ids": np.concatenate([[2], rng.integers(4, VOCAB, int(n))]), "values": rng.random(int(n) + 1).astype(np.float32)}
        for n in rng.integers(5, 40, 10)
    ]
    batch = PackingCollator(96, 0)(list(pack_stream(iter(cells), 96)))
    torch.manual_seed(0)
    model = build_model(family, "debug", vocab_size=VOCAB, attention_backend="sdpa").eval()
    with torch.no_grad():
        masked = model(**batch)
        monkeypatch.setattr(varlen, "varlen_attn", _reference_varlen)
        model.config.attention_backend = "varlen"
        flat = model(**batch)
    assert torch.allclose(flat.cell_embedding, masked.cell_embedding, atol=1e-5)
    real = batch["attention_mask"].bool()
    assert torch.allclose(flat.last_hidden_state[real], masked.last_hidden_state[real], atol=1e-5)


def test_varlen_backend_refuses_padded_batches():
    model = build_model("geneformer", "debug", vocab_size=VOCAB, attention_backend="varlen")
    with pytest.raises(ValueError, match="packed"):
        model(input_ids=torch.randint(4, VOCAB, (2, 8)))


@pytest.mark.parametrize("family", ["geneformer", "scgpt", "genecompass"])
def test_recorded_attention_is_each_layers_probabilities_over_real_keys(family):
    from celltron.model_zoo.common import recording_attention

    torch.manual_seed(0)
    model = build_model(family, "debug", vocab_size=VOCAB).eval()
    ids = torch.randint(4, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "values": torch.rand(2, 9)}
    with torch.no_grad():
        plain = model(**batch).last_hidden_state
        with recording_attention([]) as records:
            recorded = model(**batch).last_hidden_state
    torch.testing.assert_close(plain, recorded)  # recording changes nothing
    assert len(records) == model.config.num_hidden_layers
    for probabilities in records:
        assert probabilities.shape == (2, 9, 9)
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 9))
        assert probabilities[1, :, 6:].abs().max() == 0  # padding receives no attention
