"""Official scGPT checkpoints (`best_model.pt` + `args.json` + `vocab.json`) -> a celltron folder.

The architecture is read from the state dict itself (which heads exist, their shapes) and the
hyperparameters from args.json; both the flash-attn layout (`self_attn.Wqkv.*`) and PyTorch's
(`self_attn.in_proj_*`) load.
"""

from __future__ import annotations

import json
from pathlib import Path

from celltron.errors import CheckpointError
from celltron.inputs import MissingInputError, load_torch_checkpoint, read_json
from celltron.io import check_output_folder, write_folder_atomically
from celltron.model_zoo.scgpt.configuration_scgpt import ScGPTConfig
from celltron.model_zoo.scgpt.modeling_scgpt import ScGPTModel
from celltron.tokenizers.binned import BinnedTokenizer
from celltron.tokenizers.vocab import GeneVocab

# heads used only while scGPT trains (adversarial batch discriminator) and carry no output
TRAINING_ONLY_PREFIXES = ("grad_reverse_discriminator.",)
UNSUPPORTED_PREFIXES = {"dsbn.": "domain-specific batch norm (DSBN)", "bn.": "batch norm of the input embeddings"}
INPUT_STYLES = {"binned": "binned", "log1p": "log1p", "normed_raw": "normalized"}


def _checkpoint_files(source: Path) -> tuple[Path, Path, Path]:
    folder = source.parent if source.is_file() else source
    weights = source if source.is_file() else folder / "best_model.pt"
    for path, what in (
        (weights, "weights (best_model.pt)"),
        (folder / "args.json", "args.json"),
        (folder / "vocab.json", "vocab.json"),
    ):
        if not path.exists():
            raise MissingInputError(
                f"{path}: missing scGPT {what}; an scGPT checkpoint folder holds best_model.pt, args.json and vocab.json"
            )
    return weights, folder / "args.json", folder / "vocab.json"


def rename_flash_keys(state: dict) -> dict:
    """flash-attn's packed `Wqkv` projection -> PyTorch's `in_proj_weight`/`in_proj_bias`
    (same q, k, v row order)."""
    renamed = {}
    for key, tensor in state.items():
        key = key.replace("self_attn.Wqkv.weight", "self_attn.in_proj_weight").replace(
            "self_attn.Wqkv.bias", "self_attn.in_proj_bias"
        )
        renamed[key] = tensor
    return renamed


def config_from_checkpoint(args: dict, state: dict, vocab: dict) -> ScGPTConfig:
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer_encoder.layers.")}
    hidden = state["encoder.embedding.weight"].shape[1]
    style = args.get("input_emb_style", "continuous")
    return ScGPTConfig(
        vocab_size=state["encoder.embedding.weight"].shape[0],
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=int(args.get("nheads", args.get("nhead", 8))),
        intermediate_size=state["transformer_encoder.layers.0.linear1.weight"].shape[0],
        dropout=float(args.get("dropout", 0.2)),
        norm_scheme="pre" if args.get("pre_norm") else "post",
        input_emb_style=style,
        n_input_bins=state["value_encoder.embedding.weight"].shape[0] if style == "category" else int(args.get("n_bins", 51)) + 2,
        pad_token_id=int(vocab[args.get("pad_token", "<pad>")]),
        pad_value=float(args.get("pad_value", -2)),
        mask_value=float(args.get("mask_value", -1)),
        do_mvc="mvc_decoder.gene2query.weight" in state,
        explicit_zero_prob="decoder.zero_logit.0.weight" in state,
        use_batch_labels="batch_encoder.embedding.weight" in state,
        num_batch_labels=state["batch_encoder.embedding.weight"].shape[0] if "batch_encoder.embedding.weight" in state else 0,
        n_cls=state["cls_decoder.out_layer.weight"].shape[0] if "cls_decoder.out_layer.weight" in state else 1,
        nlayers_cls=1 + sum(1 for k in state if k.startswith("cls_decoder._decoder.") and k.endswith(".weight")) // 2,
        generative="flag_encoder.weight" in state,
    )


def _save_tokenizer(vocab_path: Path, args: dict, out: Path) -> None:
    vocab = GeneVocab.from_scgpt(vocab_path)
    tokenizer = BinnedTokenizer(
        vocab,
        [e for e in vocab.ensembl_ids if e],
        n_bins=int(args.get("n_bins", 51)),
        value_style=INPUT_STYLES.get(args.get("input_style", "binned"), "binned"),
        max_len=int(args.get("max_seq_len", 1200)),
    )
    tokenizer.save_pretrained(out)


def convert_scgpt(source, out, overwrite: bool = False) -> Path:
    """Convert an scGPT checkpoint folder (or its best_model.pt) into a celltron model folder
    (config.json, model.safetensors, tokenizer files), written atomically; an existing `out` is
    replaced only when celltron wrote it, or with `overwrite`."""
    source, out = Path(source), Path(out)
    protected = [("the checkpoint being converted", source)]
    check_output_folder(out, overwrite=overwrite, protected=protected)  # before the (slow) load: a refusal costs nothing
    weights, args_path, vocab_path = _checkpoint_files(source)
    args, vocab = read_json(args_path, "scGPT args"), read_json(vocab_path, "scGPT vocabulary")
    state = rename_flash_keys(
        load_torch_checkpoint(weights, "pass scGPT's best_model.pt, downloaded completely", weights_only=True)
    )
    for prefix, what in UNSUPPORTED_PREFIXES.items():
        if any(k.startswith(prefix) for k in state):
            raise CheckpointError(f"{weights}: uses {what} ({prefix}* weights), which celltron's scGPT does not implement")
    state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    model = ScGPTModel(config_from_checkpoint(args, state, vocab))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or result.missing_keys:
        raise CheckpointError(
            f"{weights}: weights do not match the scGPT architecture; unexpected {result.unexpected_keys[:5]}, missing {result.missing_keys[:5]}"
        )

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        _save_tokenizer(vocab_path, args, folder)
        (folder / "conversion.json").write_text(json.dumps({"source": str(source), "family": "scgpt", "args": args}, indent=1))

    return write_folder_atomically(out, fill, overwrite=overwrite, protected=protected, written_by="celltron convert scgpt")
