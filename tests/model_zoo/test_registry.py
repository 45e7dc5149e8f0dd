"""The size registry, Auto-class loading, `celltron convert`, and what every family supports:
save/load round trips, torch.compile, activation checkpointing, bf16 autocast."""

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, BertForMaskedLM, BertModel

import celltron  # noqa: F401  (registers the Auto classes)
from celltron.cli import main
from celltron.model_zoo import build_model, list_models
from celltron.model_zoo.geneformer import GeneformerConfig
from celltron.tokenizers.collate import MLMCollator, ValueMaskingCollator
from celltron.tokenizers.schemes import load_tokenizer

VOCAB = 64


def test_published_sizes_have_their_parameter_counts():
    counts = {(row["family"], row["size"]): row["parameters"] for row in list_models()}
    # the element count of the released Geneformer-V2-316M weights
    assert counts["geneformer", "316M"] == 316_354_867
    assert 10.0e6 < counts["geneformer", "10M"] < 10.6e6
    assert 103e6 < counts["geneformer", "104M"] < 106e6
    assert 1.0e9 < counts["geneformer", "1b"] < 1.1e9
    assert 50e6 < counts["scgpt", "whole-human"] < 53e6
    assert counts["genecompass", "small"] < counts["genecompass", "base"]


def _batch(family, seed=0):
    rng = np.random.default_rng(seed)
    cells = [
        {"input_ids": np.concatenate([[2], rng.integers(4, VOCAB, int(n))]), "values": rng.random(int(n) + 1).astype(np.float32)}
        for n in rng.integers(5, 20, 4)
    ]
    if family == "scgpt":
        return ValueMaskingCollator(0, mask_ratio=0.3, generator=torch.Generator().manual_seed(seed))(cells)
    values_key = "values" if family == "genecompass" else None
    return MLMCollator(
        0, 1, [0, 1, 2, 3], VOCAB, probability=0.3, generator=torch.Generator().manual_seed(seed), values_key=values_key
    )(cells)


def _debug(family, **overrides):
    torch.manual_seed(0)
    return build_model(family, "debug", vocab_size=VOCAB, **overrides)


FAMILIES = ["geneformer", "scgpt", "genecompass"]


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_folder_loads_through_auto_model(family, tmp_path):
    model = _debug(family).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    batch = _batch(family)
    with torch.no_grad():
        if family == "geneformer":  # a plain BERT folder: AutoModel gives transformers' BertModel
            assert isinstance(loaded, BertModel)
            expected = model(**batch).last_hidden_state
            got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            real = batch["attention_mask"].bool()
            assert torch.allclose(got[real], expected[real], atol=1e-5)
        else:
            assert type(loaded) is type(model)
            assert torch.allclose(loaded(**batch).loss, model(**batch).loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_checkpointing_and_bf16(family):
    model = _debug(family).train()
    batch = _batch(family)
    torch.manual_seed(0)
    eager = model(**batch).loss
    model.activation_checkpointing_enable()
    torch.manual_seed(0)
    checkpointed = model(**batch).loss
    checkpointed.backward()
    assert torch.allclose(eager, checkpointed, atol=1e-6)
    model.activation_checkpointing_disable()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(**batch).loss)
    model.eval()
    compiled = torch.compile(model)
    with torch.no_grad():
        assert torch.allclose(compiled(**batch).loss, model(**batch).loss, atol=1e-5)


def _official_geneformer(folder):
    torch.manual_seed(0)
    reference = BertForMaskedLM(
        GeneformerConfig.from_size("10M", num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    )
    reference.save_pretrained(folder, safe_serialization=False)  # the released folders hold pytorch_model.bin
    return reference.eval()


def test_convert_geneformer_cli(tmp_path):
    reference = _official_geneformer(tmp_path / "official")
    assert main(["convert", "geneformer", str(tmp_path / "official"), "--out", str(tmp_path / "converted")]) == 0
    converted = AutoModelForMaskedLM.from_pretrained(tmp_path / "converted").eval()
    ids = torch.randint(4, 25426, (2, 12))
    with torch.no_grad():
        assert torch.allclose(converted(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)
    tokenizer = load_tokenizer(tmp_path / "converted", ["ENSG00000000003", "ENSG00000000005"])
    assert tokenizer.max_len == 2048  # V1 dictionary, told by its 25,426 tokens


def test_convert_refuses_an_unknown_dictionary(tmp_path, capsys):
    torch.manual_seed(0)
    BertForMaskedLM(GeneformerConfig.from_size("debug", vocab_size=VOCAB)).save_pretrained(tmp_path / "odd")
    assert main(["convert", "geneformer", str(tmp_path / "odd"), "--out", str(tmp_path / "out")]) == 2
    assert "--dictionary" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_models_lists_every_family(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("geneformer", "scgpt", "genecompass", "316M", "whole-human", "316,354,867"):
        assert name in out


@pytest.mark.parametrize("family", FAMILIES)
def test_flop_formula_matches_torch_flop_counter(family):
    """A third of the training formula (forward only) against torch's own count of a forward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from celltron.model_zoo.registry import flops_per_token

    torch.manual_seed(0)
    model = build_model(family, "debug", vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_attention_heads=4).eval()
    tokens = 128
    batch = {"input_ids": torch.randint(4, VOCAB, (2, tokens)), "values": torch.rand(2, tokens)}
    # the math SDPA backend runs attention as matmuls, which the counter sees
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**batch)
    counted = counter.get_total_flops() / (2 * tokens)
    assert flops_per_token(model.config, tokens) / 3 == pytest.approx(counted, rel=0.1)


@pytest.mark.parametrize("family", ["geneformer", "scgpt"])
def test_families_without_fused_genes_give_heads_their_input_embeddings(family):
    from celltron.model_zoo.registry import gene_token_table

    model = _debug(family)
    weight = model.get_input_embeddings().weight
    assert gene_token_table(model) is weight
    table = gene_token_table(model, torch.tensor([5, -1, 3, 5]))
    assert torch.equal(table[[3, 5]], weight[[3, 5]]) and not table[[0, 1, 2, 4]].any()
