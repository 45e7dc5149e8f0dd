"""scGPT family: official checkpoint layouts convert and give the reference model's outputs;
padded = packed; generative mode; it learns."""

import json

import numpy as np
import pytest
import torch

from celltron.model_zoo.scgpt import ScGPTConfig, ScGPTModel
from celltron.model_zoo.scgpt.convert import convert_scgpt
from celltron.tokenizers.collate import PackingCollator, ValueMaskingCollator, pack_stream
from celltron.tokenizers.vocab import bundled_vocab_json
from tests.scgpt_reference import reference_transformer_model

VOCAB = 80
N_BINS = 11


def _scgpt_vocab() -> dict:
    genes = [g for g, _ in sorted(bundled_vocab_json("scgpt_human").items(), key=lambda kv: kv[1]) if not g.startswith("<")]
    return {"<pad>": 0, "<cls>": 1, "<eoc>": 2, **{g: i + 3 for i, g in enumerate(genes[: VOCAB - 3])}}


def _official_checkpoint(folder, layout: str, **options):
    """A randomly initialised scGPT TransformerModel saved as scGPT releases it."""
    torch.manual_seed(0)
    Reference = reference_transformer_model()
    kwargs = dict(
        ntoken=VOCAB,
        d_model=32,
        nhead=4,
        d_hid=48,
        nlayers=2,
        nlayers_cls=3,
        n_cls=5,
        vocab={"<pad>": 0},
        dropout=0.2,
        pad_token="<pad>",
        pad_value=-2,
        do_mvc=True,
        cell_emb_style="cls",
    )
    kwargs.update(options)
    reference = Reference(**kwargs)
    with torch.no_grad():  # make every LayerNorm and bias matter
        for name, parameter in reference.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    state = reference.state_dict()
    if layout == "flash":
        state = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v for k, v in state.items()}
    folder.mkdir()
    torch.save(state, folder / "best_model.pt")
    args = {
        "embsize": 32,
        "nheads": 4,
        "d_hid": 48,
        "nlayers": 2,
        "n_layers_cls": 3,
        "dropout": 0.2,
        "pad_token": "<pad>",
        "pad_value": -2,
        "mask_value": -1,
        "n_bins": N_BINS,
        "input_style": "binned",
        "input_emb_style": kwargs.get("input_emb_style", "continuous"),
        "MVC": True,
        "fast_transformer": layout == "flash",
        "max_seq_len": 64,
    }
    (folder / "args.json").write_text(json.dumps(args))
    (folder / "vocab.json").write_text(json.dumps(_scgpt_vocab()))
    return reference.eval()


def _cells(n, seed=0, binned=False):
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n):
        length = int(rng.integers(5, 30))
        ids = np.concatenate([[1], rng.choice(np.arange(3, VOCAB), length, replace=False)])
        values = (
            rng.integers(1, N_BINS, length + 1).astype(np.float32) if binned else rng.random(length + 1).astype(np.float32) * 5
        )
        values[0] = 0.0
        cells.append({"input_ids": ids, "values": values})
    return cells


CASES = {
    "flash-continuous-mvc-zero": ("flash", dict(explicit_zero_prob=True)),
    "torch-category-batch": (
        "torch",
        dict(
            input_emb_style="category", n_input_bins=N_BINS + 2, use_batch_labels=True, num_batch_labels=3, pad_value=N_BINS + 1
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_checkpoint_gives_the_reference_outputs(tmp_path, case):
    layout, options = CASES[case]
    reference = _official_checkpoint(tmp_path / "official", layout, **options)
    out = convert_scgpt(tmp_path / "official", tmp_path / "converted")
    model = ScGPTModel.from_pretrained(out).eval()
    pad_value = options.get("pad_value", -2)
    batch = ValueMaskingCollator(0, mask_ratio=0.0, pad_value=pad_value)(_cells(6, binned="category" in case))
    padding = batch["attention_mask"] == 0
    batch_labels = torch.tensor([0, 1, 2, 0, 1, 2]) if options.get("use_batch_labels") else None
    with torch.no_grad():
        expected = reference(batch["input_ids"], batch["values"], padding, batch_labels=batch_labels, CLS=True, MVC=True)
        got = model(
            input_ids=batch["input_ids"],
            values=batch["values"],
            attention_mask=batch["attention_mask"],
            batch_labels=batch_labels,
            classify=True,
        )
    real = ~padding
    assert torch.allclose(got.cell_embedding, expected["cell_emb"], atol=1e-5)
    assert torch.allclose(got.expression[real], expected["mlm_output"][real], atol=1e-5)
    assert torch.allclose(got.mvc_expression[real], expected["mvc_output"][real], atol=1e-5)
    assert torch.allclose(got.class_logits, expected["cls_output"], atol=1e-5)
    if options.get("explicit_zero_prob"):
        assert torch.allclose(got.zero_probs[real], expected["mlm_zero_probs"][real], atol=1e-5)
    assert (out / "tokenizer_config.json").exists() and (out / "vocab.json").exists()


def test_converter_names_what_is_missing(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "best_model.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="args.json"):
        convert_scgpt(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _debug_model(**overrides):
    torch.manual_seed(0)
    return ScGPTModel(ScGPTConfig.from_size("debug", vocab_size=VOCAB, dropout=0.0, **overrides)).eval()


def test_padded_and_packed_give_the_same_cells():
    model = _debug_model(use_batch_labels=True, num_batch_labels=3)
    cells = _cells(9, seed=2)
    labels = torch.tensor([i % 3 for i in range(9)])
    padded = ValueMaskingCollator(0, mask_ratio=0.0)(cells)
    packs = list(pack_stream(iter(cells), max_tokens=80))
    packed = PackingCollator(80, 0)(packs)
    with torch.no_grad():
        a = model(
            input_ids=padded["input_ids"], values=padded["values"], attention_mask=padded["attention_mask"], batch_labels=labels
        )
        b = model(
            input_ids=packed["input_ids"],
            values=packed["values"],
            attention_mask=packed["attention_mask"],
            cu_seqlens=packed["cu_seqlens"],
            batch_labels=labels,
        )
    assert torch.allclose(a.cell_embedding, b.cell_embedding, atol=1e-5)
    spans = [(r, int(cu[k]), int(cu[k + 1])) for r, cu in enumerate(packed["cu_seqlens"]) for k in range(len(packs[r]))]
    for i, (r, lo, hi) in enumerate(spans):
        assert torch.allclose(a.expression[i, : hi - lo], b.expression[r, lo:hi], atol=1e-5)
        assert torch.allclose(a.mvc_expression[i, : hi - lo], b.mvc_expression[r, lo:hi], atol=1e-5)


def test_generated_genes_are_invisible_to_the_others():
    """In generative mode, changing a gene to generate changes nothing for the known genes."""
    model = _debug_model()
    cells = _cells(2, seed=3)
    batch = ValueMaskingCollator(0, mask_ratio=0.0)(cells)
    gen_mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    gen_mask[:, -3:] = True
    gen_mask &= batch["attention_mask"].bool()
    other = batch["input_ids"].clone()
    other[gen_mask] = (other[gen_mask] + 1) % VOCAB
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], values=batch["values"], attention_mask=batch["attention_mask"], gen_mask=gen_mask)
        b = model(input_ids=other, values=batch["values"], attention_mask=batch["attention_mask"], gen_mask=gen_mask)
    known = batch["attention_mask"].bool() & ~gen_mask
    assert torch.allclose(a.expression[known], b.expression[known], atol=1e-6)
    assert not torch.allclose(a.expression[gen_mask], b.expression[gen_mask])


@pytest.mark.parametrize("generative", [False, True])
def test_one_step_lowers_the_loss(generative):
    model = _debug_model().train()
    batch = ValueMaskingCollator(0, mask_ratio=0.4, generator=torch.Generator().manual_seed(0))(_cells(16, seed=4))
    if generative:
        batch["gen_mask"] = batch["values"] == -1.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    before = model(**batch).loss
    before.backward()
    optimizer.step()
    torch.manual_seed(0)
    after = model(**batch).loss
    assert after < before


def test_a_new_model_starts_its_gene_embedding_uniform_in_a_tenth_as_scgpt_does():
    from celltron.model_zoo.registry import build_model

    weight = build_model("scgpt", "debug").encoder.embedding.weight
    assert weight.abs().max() <= 0.1 and abs(weight.std().item() - 0.2 / np.sqrt(12)) < 0.005  # U(-0.1, 0.1), not N(0, 1)
