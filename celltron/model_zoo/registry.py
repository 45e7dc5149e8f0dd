"""One registry of model families (celltron.model_zoo.spec.Family records) and their named sizes:
build a model by (family, size), list them with parameter counts, and register them with
transformers' Auto classes. Adding a family is one folder (its config, model and `family.py`
record) plus one `register_family` call: the built-in families are registered at the end of this
module.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from celltron.errors import ConfigError, InputError
from celltron.inputs import MODEL_FIX, MissingInputError, check_model_files, first_line, read_json
from celltron.model_zoo.genecompass.family import FAMILY as GENECOMPASS
from celltron.model_zoo.geneformer.family import FAMILY as GENEFORMER
from celltron.model_zoo.scgpt.family import FAMILY as SCGPT
from celltron.model_zoo.spec import EncoderParts, Family
from celltron.tokenizers.multimodal import CONFIG as MULTIMODAL_CONFIG
from celltron.tokenizers.multimodal import saved_token_count
from celltron.tokenizers.schemes import CONFIG_FILE, scheme_names
from celltron.tokenizers.vocab import VOCAB_FILE

FAMILIES: dict[str, Family] = {}
# the family of configs no family claims (plain transformers configs): official Geneformer
# folders are plain BERT checkpoints
DEFAULT_FAMILY = "geneformer"


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def register_family(spec: Family) -> Family:
    """Check a family record and add it: pretraining, fine-tuning, FSDP, MFU, model cards and
    `celltron convert` then know it, and transformers' Auto classes load its folders."""

    if not isinstance(spec, Family):
        raise ConfigError(f"register_family takes a celltron.model_zoo.spec.Family, got {type(spec).__name__}")
    where = f"model family {spec.name!r}"
    if FAMILIES.get(spec.name) is spec:
        return spec
    if not spec.name or spec.name in FAMILIES:
        raise ConfigError(f"{where}: {'already registered' if spec.name else 'needs a name'}")
    if not (isinstance(spec.config_class, type) and issubclass(spec.config_class, PretrainedConfig)):
        raise ConfigError(f"{where}: config_class must be a transformers PretrainedConfig subclass")
    if not hasattr(spec.config_class, "from_size"):
        raise ConfigError(f"{where}: config_class needs a from_size(size, vocab_size=None, **overrides) classmethod")
    if not (isinstance(spec.model_class, type) and issubclass(spec.model_class, PreTrainedModel)):
        raise ConfigError(f"{where}: model_class must be a transformers PreTrainedModel subclass")
    if not spec.sizes:
        raise ConfigError(f"{where}: no named sizes")
    unknown = [s for s in spec.schemes if s not in scheme_names()]
    if not spec.schemes or unknown:
        raise ConfigError(f"{where}: tokenizer schemes {list(spec.schemes)} must be some of {scheme_names()}")
    if not (isinstance(spec.layer_class, type) and issubclass(spec.layer_class, nn.Module)):
        raise ConfigError(f"{where}: layer_class must be the family's Transformer layer (an nn.Module subclass)")
    if not isinstance(spec.parts, EncoderParts):
        raise ConfigError(f"{where}: parts must be an EncoderParts")
    for name in ("masking", "flops", "build_defaults"):
        if not callable(getattr(spec, name)):
            raise ConfigError(f"{where}: {name} must be callable")
    missing = [name for name in spec.auto_classes if not hasattr(transformers, name)]
    if missing:
        raise ConfigError(f"{where}: transformers has no {', '.join(missing)}")
    if spec.converter is not None and not re.fullmatch(r"[\w.]+:\w+", spec.converter):
        raise ConfigError(f"{where}: converter must be 'module:function', got {spec.converter!r}")
    FAMILIES[spec.name] = spec
    _register_auto(spec)
    return spec


def unregister_family(name: str) -> None:
    """Remove a family added with register_family (tests), its Auto classes included."""
    spec = FAMILIES.pop(name, None)
    if spec is None or not spec.auto_classes:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    CONFIG_MAPPING._extra_content.pop(spec.config_class.model_type, None)
    for auto in spec.auto_classes:
        getattr(transformers, auto)._model_mapping._extra_content.pop(spec.config_class, None)


@contextlib.contextmanager
def registered_family(spec: Family):
    """`with registered_family(spec):` the family exists inside the block only."""
    register_family(spec)
    try:
        yield spec
    finally:
        unregister_family(spec.name)


def families_with_converter() -> list[str]:
    """Families `celltron convert` takes: those with an official-checkpoint converter."""
    return [name for name, spec in FAMILIES.items() if spec.converter]


def convert(family_name: str, source, out, overwrite: bool = False, **options) -> Path:
    """Convert an official checkpoint of `family_name` into a celltron model folder with the
    family's converter; options the converter does not take (or left None) are ignored."""
    spec = family(family_name)
    if not spec.converter:
        raise ConfigError(
            f"{family_name} has no checkpoint converter; `celltron convert` takes {', '.join(families_with_converter())}"
        )
    module, _, function = spec.converter.partition(":")
    converter = getattr(importlib.import_module(module), function)
    accepted = inspect.signature(converter).parameters
    options = {k: v for k, v in options.items() if v is not None and k in accepted}
    return converter(source, out, overwrite=overwrite, **options)


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
    spec = next((f for f in FAMILIES.values() if isinstance(config, f.config_class)), None)
    return spec or family_of_model_type(getattr(config, "model_type", None))


def family_of_model_type(model_type: str | None) -> Family:
    """The family of a config.json's `model_type` (its config class's, or one it claims in
    model_types); any other is DEFAULT_FAMILY's (plain BERT folders are Geneformer's)."""
    claimed = (f for f in FAMILIES.values() if model_type == f.config_class.model_type or model_type in f.model_types)
    return next(claimed, FAMILIES[DEFAULT_FAMILY])


def parts_of(model: nn.Module) -> EncoderParts:
    """Where a loaded model keeps its encoder, embeddings, layers and LoRA targets."""
    return family_of(model.config).parts


def layer_classes() -> set[type[nn.Module]]:
    """Every registered family's Transformer layer (FSDP's wrapping unit)."""
    return {spec.layer_class for spec in FAMILIES.values()}


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
    added = saved_token_count(folder)  # protein / chromatin tokens after the RNA vocabulary
    described = f"the {settings.get('scheme', 'celltron')} tokenizer saved beside it ({VOCAB_FILE}"
    described += f" and {added} protein / chromatin tokens of {MULTIMODAL_CONFIG})" if added else ")"
    return len(vocab["tokens"]) + added, described


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
    """Let `AutoConfig` / `AutoModel` (and each family's further Auto classes) load celltron
    folders. Families without auto_classes (Geneformer: plain BERT checkpoints) need nothing."""
    for spec in FAMILIES.values():
        _register_auto(spec)


def _register_auto(spec: Family) -> None:
    if not spec.auto_classes:
        return
    try:
        AutoConfig.register(spec.config_class.model_type, spec.config_class)
    except ValueError:  # already registered (module reloaded)
        pass
    for name in spec.auto_classes:
        try:
            getattr(transformers, name).register(spec.config_class, spec.model_class)
        except ValueError:
            pass


def flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    """Training FLOPs per token of any celltron model (see each family's formula), for MFU."""
    return family_of(config).flops(config, seq_len)


def resolve_model_folder(model: str) -> Path:
    """A local folder, or a Hub repository id (`owner/name[@revision]`) fetched into the local cache;
    a model whose vocabulary is not its tokenizer's is refused here, before any work."""
    folder = model_folder(model)
    check_vocabulary(folder)
    return folder


def base_of(model: nn.Module) -> nn.Module:
    """The family model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def gene_token_table(model: nn.Module, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(largest token + 1, hidden): what `model` feeds its encoder for each gene token before
    position and context, in the rows of `tokens` (None: every token), zero elsewhere;
    differentiable. GeneCompass: the fused embedding (learned vector, value 0 and its priors
    through the fusion MLP: `gene_token_embeddings`), so that heads reading genes see the
    priors; every other family: its input embedding."""
    model = base_of(model)
    weight = model.get_input_embeddings().weight
    fused = getattr(model, "gene_token_embeddings", None)
    if tokens is None:
        return fused(torch.arange(len(weight), device=weight.device)) if fused else weight
    tokens = torch.unique(tokens[tokens >= 0])
    rows = fused(tokens) if fused else weight[tokens]
    size = int(tokens.max()) + 1 if len(tokens) else 1
    return torch.zeros(size, rows.shape[-1], dtype=rows.dtype, device=rows.device).index_copy(0, tokens, rows)


# The built-in families, registered once, here. Loading celltron's model code registers it, so
# AutoConfig / AutoModel know the families however that code was reached (celltron/__init__.py
# relies on this when transformers is first imported from inside this module).
for _spec in (GENEFORMER, SCGPT, GENECOMPASS):
    register_family(_spec)
