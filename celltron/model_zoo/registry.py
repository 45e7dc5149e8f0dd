"""One registry of model families and their named sizes: build a model by (family, size), list
them with parameter counts, and register them with transformers' Auto classes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel

from celltron.errors import ConfigError, InputError
from celltron.inputs import MODEL_FIX, MissingInputError, check_model_files, first_line, read_json
from celltron.model_zoo.common import encoder_flops_per_token
from celltron.model_zoo.genecompass import GeneCompassConfig, GeneCompassForPretraining
from celltron.model_zoo.genecompass.configuration_genecompass import SIZES as GENECOMPASS_SIZES
from celltron.model_zoo.genecompass.modeling_genecompass import genecompass_flops_per_token
from celltron.model_zoo.geneformer import GeneformerConfig, GeneformerForMaskedLM
from celltron.model_zoo.geneformer.configuration_geneformer import SIZES as GENEFORMER_SIZES
from celltron.model_zoo.scgpt import ScGPTConfig, ScGPTModel
from celltron.model_zoo.scgpt.configuration_scgpt import SIZES as SCGPT_SIZES
from celltron.model_zoo.scgpt.modeling_scgpt import scgpt_flops_per_token
from celltron.tokenizers.saving import CONFIG_FILE
from celltron.tokenizers.vocab import VOCAB_FILE


@dataclass(frozen=True)
class Family:
    """A model family: its config and model classes, named sizes, and the vocabulary size used
    to count parameters when a size does not fix one (debug sizes, GeneCompass's corpus-built
    vocabularies)."""

    name: str
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    sizes: dict
    counting_vocab: int


FAMILIES = {
    "geneformer": Family("geneformer", GeneformerConfig, GeneformerForMaskedLM, GENEFORMER_SIZES, 20275),
    "scgpt": Family("scgpt", ScGPTConfig, ScGPTModel, SCGPT_SIZES, 60697),
    # GeneCompass's vocabulary is built from its corpus (human + mouse genes); 50,000 is an
    # assumed round figure for listing only.
    "genecompass": Family("genecompass", GeneCompassConfig, GeneCompassForPretraining, GENECOMPASS_SIZES, 50000),
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def build_config(family_name: str, size: str, vocab_size: int | None = None, **overrides) -> PretrainedConfig:
    """The config of a named size; `vocab_size` (the tokenizer's) wins over the size's own."""
    spec = family(family_name)
    if vocab_size is None and "vocab_size" not in spec.sizes.get(size, {}):
        vocab_size = spec.counting_vocab
    return spec.config_class.from_size(size, vocab_size=vocab_size, **overrides)


def build_model(family_name: str, size: str, vocab_size: int | None = None, **overrides) -> PreTrainedModel:
    return family(family_name).model_class(build_config(family_name, size, vocab_size, **overrides))


def family_of(config: PretrainedConfig) -> Family:
    """The family of a loaded config; plain BERT configs (official Geneformer folders) are geneformer."""
    return next((f for f in FAMILIES.values() if isinstance(config, f.config_class)), FAMILIES["geneformer"])


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


def model_folder(model) -> Path:
    """A local model folder as is, or a Hub repository id (`owner/name`, or `owner/name@revision`
    for a branch, tag or commit) fetched into the Hugging Face cache (`snapshot_download`; from
    the cache alone under HF_HUB_OFFLINE=1 once fetched).

    Args:
        model: folder path, or Hub repository id.
    """
    path = Path(model)
    if path.exists():
        return path
    text = str(model)
    if not HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise MissingInputError(f"{text}: no such model folder (nor a Hub id of the form owner/name)")
    from huggingface_hub import snapshot_download

    repo_id, _, revision = text.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None))
    except Exception as error:  # offline and not cached, unknown repository, no access
        raise MissingInputError(
            f"{text}: not a local folder, and the Hub could not provide it ({type(error).__name__}: "
            f"{error}); check the id, log in (`hf auth login` or HF_TOKEN) for private models, "
            "or unset HF_HUB_OFFLINE"
        ) from error


def load_pretrained(folder) -> PreTrainedModel:
    """A celltron, exported or converted model, in its family's class.

    Args:
        folder: the model folder (config.json + weights), or a Hub repository id (`owner/name`,
            `owner/name@revision`), fetched through the Hugging Face cache.
    """
    folder = model_folder(folder)
    if not (folder / "config.json").exists():
        raise MissingInputError(
            f"{folder}: no config.json; pass a folder written by `celltron export`, "
            "`celltron convert` or a pretraining run's export/ folder"
        )
    check_model_files(folder)  # a damaged config.json or weights file: named here, not deep in transformers
    register_auto_classes()
    try:
        spec = family_of(AutoConfig.from_pretrained(folder))
        return spec.model_class.from_pretrained(folder)
    except OSError as error:  # transformers' word for missing or unreadable weights
        raise InputError(f"{folder}: the model cannot be loaded ({first_line(error)}); {MODEL_FIX}") from error


def check_vocabulary(folder, tokenizer_size: int | None = None, tokenizer_name: str = "", fix: str = "") -> None:
    """Refuse, before any work, a model whose vocabulary is not the tokenizer's: ids past the
    model's embedding rows would fail deep inside it (an IndexError), and a shorter tokenizer
    would feed genes to rows trained for other genes.

    Args:
        folder: the model folder (config.json's vocab_size is the model's vocabulary).
        tokenizer_size: tokens of the tokenizer given to the model; None: the tokenizer saved
            in `folder` (nothing to check when there is none).
        tokenizer_name: how the message names that tokenizer. fix: what the user should do.
    """
    folder = Path(folder)
    model_size = read_json(folder / "config.json", "model config", MODEL_FIX).get("vocab_size")
    if tokenizer_size is None:
        saved = _saved_tokenizer(folder)
        if saved is None:
            return  # no celltron tokenizer beside the model: whoever loads one says so
        tokenizer_size, tokenizer_name = saved
        fix = fix or (
            "put back the tokenizer the model was trained with (the vocab.json, tokenizer_config.json and "
            "gene_medians.json its export wrote), or export the model again"
        )
    if model_size is not None and model_size != tokenizer_size:
        fix = fix or "use the tokenizer the model was trained with"
        raise InputError(
            f"{folder}: the model's vocabulary has {model_size} tokens (config.json vocab_size) but "
            f"{tokenizer_name or 'its tokenizer'} has {tokenizer_size}; {fix}"
        )


def _saved_tokenizer(folder: Path) -> tuple[int, str] | None:
    """(tokens, description) of the celltron tokenizer saved in a model folder, or None."""
    if not (folder / VOCAB_FILE).exists():
        return None
    vocab = read_json(folder / VOCAB_FILE, "tokenizer vocabulary", MODEL_FIX)
    if not isinstance(vocab, dict) or "tokens" not in vocab:
        return None
    settings = read_json(folder / CONFIG_FILE, "tokenizer config", MODEL_FIX) if (folder / CONFIG_FILE).exists() else {}
    return len(vocab["tokens"]), f"the {settings.get('scheme', 'celltron')} tokenizer saved beside it ({VOCAB_FILE})"


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def list_models() -> list[dict]:
    """Every (family, size) with its shape and parameter count (built on the meta device)."""
    rows = []
    for spec in FAMILIES.values():
        for size in spec.sizes:
            config = build_config(spec.name, size)
            with torch.device("meta"):
                model = spec.model_class(config)
            rows.append(
                {
                    "family": spec.name,
                    "size": size,
                    "layers": config.num_hidden_layers,
                    "hidden": config.hidden_size,
                    "heads": config.num_attention_heads,
                    "intermediate": config.intermediate_size,
                    "vocab": config.vocab_size,
                    "parameters": count_parameters(model),
                }
            )
    return rows


def register_auto_classes() -> None:
    """Let `AutoConfig` / `AutoModel` load celltron folders. Geneformer folders are plain BERT
    checkpoints (`model_type: bert`) and need nothing."""
    for config_class, model_class in ((ScGPTConfig, ScGPTModel), (GeneCompassConfig, GeneCompassForPretraining)):
        try:
            AutoConfig.register(config_class.model_type, config_class)
        except ValueError:  # already registered (module reloaded)
            pass
        for auto in (AutoModel, AutoModelForMaskedLM) if model_class is GeneCompassForPretraining else (AutoModel,):
            try:
                auto.register(config_class, model_class)
            except ValueError:
                pass


def flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    """Training FLOPs per token of any celltron model (see each family's formula), for MFU."""
    if isinstance(config, ScGPTConfig):
        return scgpt_flops_per_token(config, seq_len)
    if isinstance(config, GeneCompassConfig):
        return genecompass_flops_per_token(config, seq_len)
    # geneformer: the encoder, its vocabulary projection and the head's hidden x hidden transform
    h = config.hidden_size
    return (
        encoder_flops_per_token(config.num_hidden_layers, h, config.intermediate_size, seq_len, config.vocab_size) + 6.0 * h * h
    )


# Loading celltron's model code registers it, so AutoConfig / AutoModel know the families however
# that code was reached (celltron/__init__.py relies on this when transformers is first imported
# from inside this module).
register_auto_classes()
