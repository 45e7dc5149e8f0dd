"""Geneformer family: same logits as transformers' BertForMaskedLM, padded = packed, it learns."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, BertForMaskedLM

from celltron.model_zoo.geneformer import GeneformerConfig, GeneformerForMaskedLM
from celltron.tokenizers.collate import MLMCollator, PackingCollator, pack_stream

VOCAB = 120


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    """A randomly initialised BertForMaskedLM (non-zero biases) saved as a checkpoint folder."""
    torch.manual_seed(0)
    config = GeneformerConfig.from_size("debug", vocab_size=VOCAB, hidden_act="relu")
    reference = BertForMaskedLM(config)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(std=0.1)
    folder = tmp_path_factory.mktemp("bert")
    reference.save_pretrained(folder)
    return folder


def _cells(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": np.concatenate([[2], rng.integers(4, VOCAB, int(rng.integers(5, 40))), [3]])} for _ in range(n)]


def test_same_logits_as_transformers_bert(reference_folder):
    reference = BertForMaskedLM.from_pretrained(reference_folder).eval()
    ours = GeneformerForMaskedLM.from_pretrained(reference_folder).eval()
    batch = MLMCollator(0, 1, [0, 1, 2, 3], VOCAB, probability=0.0)(_cells(6))
    with torch.no_grad():
        expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5)


def test_saved_folder_loads_in_transformers_alone(reference_folder, tmp_path):
    ours = GeneformerForMaskedLM.from_pretrained(reference_folder).eval()
    ours.save_pretrained(tmp_path)
    again = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(again) is BertForMaskedLM
    ids = torch.randint(4, VOCAB, (2, 12))
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padded_and_packed_give_the_same_cells(reference_folder, pooling):
    model = GeneformerForMaskedLM.from_pretrained(reference_folder, cell_embedding=pooling).eval()
    cells = _cells(9, seed=1)
    padded = MLMCollator(0, 1, [0, 1, 2, 3], VOCAB, probability=0.0)(cells)
    packs = list(pack_stream(iter(cells), max_tokens=128))
    packed = PackingCollator(128, 0)(packs)
    with torch.no_grad():
        a = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"])
        b = model(
            input_ids=packed["input_ids"],
            attention_mask=packed["attention_mask"],
            position_ids=packed["position_ids"],
            cu_seqlens=packed["cu_seqlens"],
        )
    assert torch.allclose(a.cell_embedding, b.cell_embedding, atol=1e-5)
    cu = packed["cu_seqlens"]
    flat = [(r, int(cu[r][k]), int(cu[r][k + 1])) for r, pack in enumerate(packs) for k in range(len(pack))]
    for i, cell in enumerate(cells):
        r, lo, hi = flat[i]
        n = len(cell["input_ids"])
        assert hi - lo == n
        assert torch.allclose(a.logits[i, :n], b.logits[r, lo:hi], atol=1e-5)


def test_one_step_lowers_the_loss():
    torch.manual_seed(0)
    model = GeneformerForMaskedLM(GeneformerConfig.from_size("debug", vocab_size=VOCAB))
    batch = MLMCollator(0, 1, [0, 1, 2, 3], VOCAB, probability=0.3, generator=torch.Generator().manual_seed(0))(_cells(16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model(**batch).loss
    before.backward()
    optimizer.step()
    after = model(**batch).loss
    assert after < before
