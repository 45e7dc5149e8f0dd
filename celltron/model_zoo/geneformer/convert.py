"""Official Geneformer checkpoints (Hugging Face `BertForMaskedLM` folders) -> a celltron folder:
the same weights as safetensors, the config with celltron's fields, and the matching rank-value
tokenizer (V1 or V2 dictionaries, told apart by the vocabulary size)."""

from __future__ import annotations

import json
from pathlib import Path

from celltron.errors import ConfigError, InputError
from celltron.inputs import MissingInputError, check_model_files
from celltron.io import check_output_folder, write_folder_atomically
from celltron.model_zoo.geneformer.configuration_geneformer import GeneformerConfig
from celltron.model_zoo.geneformer.modeling_geneformer import GeneformerForMaskedLM
from celltron.tokenizers.rank_value import RankValueTokenizer
from celltron.tokenizers.vocab import GeneVocab

DICTIONARY_OF_VOCAB_SIZE = {25426: "v1", 20275: "v2"}


def _dictionary_version(config: GeneformerConfig, source: Path, dictionary: str | None) -> str:
    if dictionary is not None:
        if dictionary not in ("v1", "v2"):
            raise ConfigError(f"dictionary must be 'v1' or 'v2', got {dictionary!r}")
        return dictionary
    if config.vocab_size not in DICTIONARY_OF_VOCAB_SIZE:
        raise InputError(
            f"{source / 'config.json'}: vocab_size {config.vocab_size} matches neither Geneformer dictionary "
            f"(V1 25,426 / V2 20,275 tokens); pass --dictionary v1|v2"
        )
    return DICTIONARY_OF_VOCAB_SIZE[config.vocab_size]


def convert_geneformer(source, out, dictionary: str | None = None, cell_embedding: str = "mean", overwrite: bool = False) -> Path:
    """Convert a Geneformer checkpoint folder into a celltron model folder, written atomically;
    an existing `out` is replaced only when celltron wrote it, or with `overwrite`."""
    source, out = Path(source), Path(out)
    if not (source / "config.json").exists():
        raise MissingInputError(
            f"{source / 'config.json'}: missing; a Geneformer checkpoint is a folder with config.json and weights"
        )
    protected = [("the checkpoint being converted", source)]
    check_output_folder(out, overwrite=overwrite, protected=protected)  # before the (slow) load: a refusal costs nothing
    check_model_files(source, "Geneformer")  # damaged config.json or weights: named before transformers reads them
    config = GeneformerConfig.from_pretrained(source, cell_embedding=cell_embedding)
    version = _dictionary_version(config, source, dictionary)
    model = GeneformerForMaskedLM.from_pretrained(source, config=config)
    vocab = GeneVocab.from_geneformer(version)

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        RankValueTokenizer.geneformer(version, [e for e in vocab.ensembl_ids if e]).save_pretrained(folder)
        (folder / "conversion.json").write_text(
            json.dumps({"source": str(source), "family": "geneformer", "dictionary": version}, indent=1)
        )

    return write_folder_atomically(out, fill, overwrite=overwrite, protected=protected, written_by="celltron convert geneformer")
