import numpy as np
import pytest
import torch

from celltron.tokenizers.collate import (
    IGNORE_INDEX,
    MLMCollator,
    PackingCollator,
    ValueMaskingCollator,
    length_grouped,
    pack_stream,
)
from celltron.tokenizers.vocab import GeneVocab

VOCAB = GeneVocab.from_geneformer("v2")


def _cells(n, seed=0, low=20, high=400):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(low, high))
        genes = rng.choice(np.arange(4, len(VOCAB)), length, replace=False)
        out.append(
            {
                "input_ids": np.concatenate([[VOCAB["<cls>"]], genes, [VOCAB["<eos>"]]]),
                "values": rng.random(length + 2),
                "cell_index": i,
            }
        )
    return out


def _mlm(seed=0):
    return MLMCollator(
        VOCAB["<pad>"], VOCAB["<mask>"], VOCAB.special_ids(), len(VOCAB), generator=torch.Generator().manual_seed(seed)
    )


def test_mlm_masks_15_percent_80_10_10_and_never_specials():
    cells = _cells(400)
    batch = _mlm()(cells)
    original = torch.nn.utils.rnn.pad_sequence(
        [torch.as_tensor(c["input_ids"]) for c in cells], batch_first=True, padding_value=VOCAB["<pad>"]
    )
    chosen = batch["labels"] != IGNORE_INDEX
    special = torch.isin(original, torch.as_tensor(VOCAB.special_ids()))
    assert not (chosen & special).any()
    assert (batch["labels"][chosen] == original[chosen]).all()
    n_genes = int((~special).sum())
    assert abs(int(chosen.sum()) / n_genes - 0.15) < 0.01
    became_mask = (batch["input_ids"] == VOCAB["<mask>"]) & chosen
    unchanged = (batch["input_ids"] == original) & chosen
    assert abs(int(became_mask.sum()) / int(chosen.sum()) - 0.8) < 0.02
    assert abs(int(unchanged.sum()) / int(chosen.sum()) - 0.1) < 0.02
    assert (batch["input_ids"][~chosen] == original[~chosen]).all()
    assert not torch.isin(batch["input_ids"][chosen & ~became_mask], torch.as_tensor(VOCAB.special_ids())).any()
    assert (batch["attention_mask"] == (original != VOCAB["<pad>"]).long()).all()


def test_mlm_is_deterministic_given_the_generator():
    cells = _cells(20)
    a, b, c = _mlm(1)(cells), _mlm(1)(cells), _mlm(2)(cells)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], c["labels"])


def test_value_masking_keeps_cls_and_marks_padding():
    cells = _cells(30)
    batch = ValueMaskingCollator(VOCAB["<pad>"], mask_ratio=0.4, generator=torch.Generator().manual_seed(0))(cells)
    for row, cell in enumerate(cells):
        n = len(cell["input_ids"])
        masked = batch["values"][row, :n] == -1
        assert not masked[0]
        assert int(masked.sum()) == round((n - 1) * 0.4)
        assert (batch["values"][row, n:] == -2).all() and (batch["input_ids"][row, n:] == VOCAB["<pad>"]).all()
        assert torch.allclose(batch["target_values"][row, :n], torch.as_tensor(cell["values"], dtype=torch.float32))


def test_length_grouping_covers_every_cell_once_and_cuts_padding():
    cells = _cells(1000)
    batches = list(length_grouped(iter(cells), batch_size=16, buffer_batches=10, generator=torch.Generator().manual_seed(0)))
    seen = sorted(c["cell_index"] for batch in batches for c in batch)
    assert seen == list(range(1000))

    def padding(groups):
        return sum(max(len(c["input_ids"]) for c in g) * len(g) - sum(len(c["input_ids"]) for c in g) for g in groups)

    plain = [cells[i : i + 16] for i in range(0, 1000, 16)]
    assert padding(batches) < padding(plain) / 4


def test_packing_matches_separate_attention():
    cells = _cells(40, low=10, high=60)
    packs = list(pack_stream(iter(cells), max_tokens=256))
    assert sum(len(p) for p in packs) == 40 and all(sum(len(c["input_ids"]) for c in p) <= 256 for p in packs)
    batch = PackingCollator(256, VOCAB["<pad>"])(packs[:2])
    assert batch["input_ids"].shape == (2, 256)
    cu = batch["cu_seqlens"][0]
    assert cu[-1] == 256
    for k, cell in enumerate(packs[0]):
        lo, hi = int(cu[k]), int(cu[k + 1])
        assert batch["input_ids"][0, lo:hi].tolist() == cell["input_ids"].tolist()
        assert batch["position_ids"][0, lo:hi].tolist() == list(range(hi - lo))
    # a block-diagonal mask from cu_seqlens gives each cell the attention it would get alone
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 8) for _ in range(3))
    segment = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.diff(cu).long())
    mask = segment[:, None] == segment[None, :]
    packed = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for j in range(len(cu) - 1):
        lo, hi = int(cu[j]), int(cu[j + 1])
        alone = torch.nn.functional.scaled_dot_product_attention(q[..., lo:hi, :], k[..., lo:hi, :], v[..., lo:hi, :])
        assert torch.allclose(packed[..., lo:hi, :], alone, atol=1e-6)


def test_packing_with_mlm_and_too_long_cells():
    cells = _cells(10, low=10, high=30)
    batch = PackingCollator(128, VOCAB["<pad>"], mlm=_mlm())(list(pack_stream(iter(cells), 128)))
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["labels"] != IGNORE_INDEX).any()
    with pytest.raises(ValueError, match="does not fit"):
        list(pack_stream(iter(_cells(1, low=300, high=301)), 128))


def test_packing_padding_positions_stay_in_range():
    cells = _cells(1, low=3, high=4)
    batch = PackingCollator(500, VOCAB["<pad>"])([cells])
    n = len(cells[0]["input_ids"])
    assert batch["position_ids"][0, :n].tolist() == list(range(n)) and (batch["position_ids"][0, n:] == 0).all()
