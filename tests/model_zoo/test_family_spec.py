"""One record per model family: a toy family registered from a test pretrains through the normal
run (config check, masking, build defaults, FSDP layer set, FLOPs, export) and is gone once
unregistered; every built-in family's record agrees with its model."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

import celltron  # noqa: F401  (registers the Auto classes)
from celltron.errors import ConfigError
from celltron.model_zoo import FAMILIES, Family, build_model, register_family, registered_family
from celltron.model_zoo.common import CellModelOutput, config_from_size, encoder_flops_per_token
from celltron.model_zoo.registry import families_with_converter, family_of, flops_per_token, layer_classes, parts_of
from celltron.model_zoo.spec import EncoderParts, VocabIds, attribute, mask_tokens, positions_for
from celltron.tokenizers.dataset import SCHEMES

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VOCAB = 64

# ---------------------------------------------------------------- a toy family

TOY_SIZES = {
    "debug": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
}


class ToyConfig(PretrainedConfig):
    model_type = "celltron_toy_test"

    def __init__(
        self,
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=0,
        **kwargs,
    ):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.intermediate_size = num_attention_heads, intermediate_size
        self.max_position_embeddings = max_position_embeddings

    @classmethod
    def from_size(cls, size, vocab_size=None, **overrides):
        return config_from_size(cls, TOY_SIZES, "toy", size, vocab_size, overrides)


class ToyLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm1, self.norm2 = nn.LayerNorm(config.hidden_size), nn.LayerNorm(config.hidden_size)

    def forward(self, hidden, padding):
        attended, _ = self.attention(hidden, hidden, hidden, key_padding_mask=padding, need_weights=False)
        hidden = self.norm1(hidden + attended)
        return self.norm2(hidden + self.output(F.gelu(self.intermediate(hidden))))


class ToyEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(ToyLayer(config) for _ in range(config.num_hidden_layers))


class ToyModel(PreTrainedModel):
    """Token + position embeddings, Transformer layers, a vocabulary head: the MLM contract of
    the built-in families (loss, and logits of the masked tokens only when asked)."""

    config_class = ToyConfig
    base_model_prefix = "toy"

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.encoder = ToyEncoder(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids, attention_mask=None, labels=None, masked_logits_only=False, **unused):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.embeddings(input_ids) + self.positions(positions)
        padding = attention_mask == 0 if attention_mask is not None else None
        for layer in self.encoder.layer:
            hidden = layer(hidden, padding)
        if masked_logits_only and labels is not None:
            chosen = labels != -100
            logits = self.head(hidden[chosen])
            loss = F.cross_entropy(logits, labels[chosen]) if len(logits) else logits.sum() * 0
            return CellModelOutput(loss=loss, logits=logits, last_hidden_state=hidden)
        logits = self.head(hidden)
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return CellModelOutput(loss=loss, logits=logits, last_hidden_state=hidden)


def toy_flops(config, seq_len):
    h = config.hidden_size
    return encoder_flops_per_token(config.num_hidden_layers, h, config.intermediate_size, seq_len, config.vocab_size)


TOY = Family(
    name="toy",
    config_class=ToyConfig,
    model_class=ToyModel,
    sizes=TOY_SIZES,
    counting_vocab=VOCAB,
    schemes=("geneformer-v2",),
    masking=mask_tokens,
    layer_class=ToyLayer,
    parts=EncoderParts("encoder", ("embeddings.", "positions."), "encoder.layer", ("intermediate", "output")),
    flops=toy_flops,
    build_defaults=positions_for,
)


@pytest.fixture
def toy():
    with registered_family(TOY) as spec:
        yield spec
    assert "toy" not in FAMILIES


def test_a_registered_toy_family_pretrains_two_steps_and_exports(toy, demo_corpus, tmp_path):
    from celltron.pretrain.config import load_config, replace
    from celltron.pretrain.run import pretrain

    assert ToyLayer in layer_classes()  # FSDP would wrap its layers
    config = replace(
        load_config(CONFIGS / "pretrain" / "geneformer_debug.yaml"),
        model={"family": "toy", "size": "debug"},
        data={"corpus": str(demo_corpus.location), "batch_size": 4, "round_cells": 16},
        trainer={"max_steps": 2, "log_every": 1, "val_every": 1000, "checkpoint_every": 1000},
        logging={"progress_bar": False, "wandb": False},
    )
    result = pretrain(config, tmp_path / "run")
    assert result.steps == 2 and not result.interrupted
    assert (result.export / "config.json").exists() and (result.export / "model.safetensors").exists()
    model = ToyModel.from_pretrained(result.export)
    # build_defaults: the position table fits the tokenizer's 256 genes plus <cls> and <eos>
    assert model.config.max_position_embeddings == 258
    assert family_of(AutoConfig.from_pretrained(result.export)) is toy


def test_unregistering_removes_the_family_and_its_auto_classes():
    with registered_family(TOY):
        assert type(AutoConfig.for_model("celltron_toy_test")) is ToyConfig
        with pytest.raises(ConfigError, match="already registered"):
            register_family(Family(**{**TOY.__dict__}))
    assert "toy" not in FAMILIES and ToyLayer not in layer_classes()
    with pytest.raises(ValueError):
        AutoConfig.for_model("celltron_toy_test")


def test_the_config_check_reads_the_record(toy):
    from celltron.pretrain.config import load_config, replace

    base = load_config(CONFIGS / "pretrain" / "geneformer_debug.yaml")
    with pytest.raises(ConfigError, match="does not feed toy"):
        replace(base, model={"family": "toy", "size": "debug"}, tokenizer={"scheme": "geneformer-v1"})
    with pytest.raises(ConfigError, match="data.generative is scgpt's mode"):
        replace(base, model={"family": "toy", "size": "debug"}, data={"generative": True})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"schemes": ("no-such-scheme",)}, "tokenizer schemes"),
        ({"layer_class": object}, "layer_class"),
        ({"auto_classes": ("AutoNothing",)}, "AutoNothing"),
        ({"converter": "not a path"}, "converter"),
    ],
)
def test_register_family_refuses_an_inconsistent_record(change, message):
    with pytest.raises(ConfigError, match=message):
        register_family(Family(**{**TOY.__dict__, "name": "broken", **change}))
    assert "broken" not in FAMILIES


# ---------------------------------------------------------------- the built-in families


@pytest.mark.parametrize("name", ["geneformer", "scgpt", "genecompass"])
def test_each_built_in_record_matches_its_model(name):
    spec = FAMILIES[name]
    assert set(spec.schemes) <= set(SCHEMES)
    model = build_model(name, "debug", vocab_size=VOCAB)
    assert family_of(model.config) is spec and parts_of(model) is spec.parts
    assert any(isinstance(module, spec.layer_class) for module in model.modules())
    layers = attribute(model, spec.parts.layers)
    assert len(layers) == model.config.num_hidden_layers and all(isinstance(layer, spec.layer_class) for layer in layers)
    encoder = attribute(model, spec.parts.encoder)
    assert all(any(p is q for q in encoder.parameters()) for p in layers.parameters())
    names = [n for n, _ in model.named_parameters()]
    assert all(any(n.startswith(prefix) for n in names) for prefix in spec.parts.embeddings)
    linears = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]
    for target in spec.parts.lora_targets:
        assert any(n == target or n.endswith("." + target) for n in linears), target
    assert spec.flops(model.config, 128) > 0 and flops_per_token(model.config, 128) == spec.flops(model.config, 128)
    assert spec.masks[0] in ("mask_probability", "mask_ratio")
    if spec.converter:
        assert name in families_with_converter()


@pytest.mark.parametrize("name", ["geneformer", "scgpt", "genecompass"])
def test_each_built_in_masking_feeds_its_model(name):
    spec = FAMILIES[name]
    rng = np.random.default_rng(0)
    cells = [
        {"input_ids": np.concatenate([[2], rng.integers(4, VOCAB, int(n))]), "values": rng.random(int(n) + 1).astype(np.float32)}
        for n in (5, 9, 12)
    ]
    data = SimpleNamespace(mask_probability=0.3, mask_ratio=0.3, generative=False)
    batch = spec.masking(VocabIds(0, 1, (0, 1, 2, 3), VOCAB), data, torch.Generator().manual_seed(0))(cells)
    torch.manual_seed(0)
    loss = build_model(name, "debug", vocab_size=VOCAB)(**batch).loss
    assert torch.isfinite(loss)


def test_convert_dispatches_to_the_family_converter(tmp_path):
    from transformers import BertForMaskedLM

    from celltron.model_zoo.geneformer import GeneformerConfig
    from celltron.model_zoo.registry import convert

    torch.manual_seed(0)
    config = GeneformerConfig.from_size("10M", num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(config).save_pretrained(tmp_path / "official", safe_serialization=False)
    out = convert("geneformer", tmp_path / "official", tmp_path / "converted", overwrite=False, dictionary=None)
    assert (out / "config.json").exists() and (out / "vocab.json").exists()
    assert families_with_converter() == ["geneformer", "scgpt"]
    with pytest.raises(ConfigError, match="genecompass has no checkpoint converter"):
        convert("genecompass", tmp_path / "official", tmp_path / "other")
