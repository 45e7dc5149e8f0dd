"""Token vocabularies and tokenizers: rank-value (Geneformer), expression-binned (scGPT),
cross-species ortholog (GeneCompass-style); scGPT's highly-variable-gene selection (scanpy's
flavors, in memory or streamed over blocks) for the binned tokenizer's `genes_subset`.

Every tokenizer follows one interface (`celltron.tokenizers.schemes`): a registry of schemes,
`encode_block(block, rng)`, `save_pretrained` / `load_tokenizer`.
"""

from __future__ import annotations

from celltron._lazy import lazy_exports

# The names below load on first use (PEP 562), as in celltron.corpus: the scheme names
# (celltron.tokenizers.schemes, the CLI's --help) must not load numpy and numba.
_EXPORTS = {
    "BinnedTokenizer": "celltron.tokenizers.binned",
    "Block": "celltron.tokenizers.schemes",
    "GeneVocab": "celltron.tokenizers.vocab",
    "HighlyVariableGenes": "celltron.tokenizers.hvg",
    "OrthologTokenizer": "celltron.tokenizers.ortholog",
    "RaggedTokens": "celltron.tokenizers.ragged",
    "RankValueTokenizer": "celltron.tokenizers.rank_value",
    "SCHEMES": "celltron.tokenizers.schemes",
    "Tokenizer": "celltron.tokenizers.schemes",
    "highly_variable_genes": "celltron.tokenizers.hvg",
    "load_tokenizer": "celltron.tokenizers.saving",
    "make_tokenizer": "celltron.tokenizers.schemes",
    "ortholog_vocab": "celltron.tokenizers.ortholog",
    "register_scheme": "celltron.tokenizers.schemes",
    "scheme_class": "celltron.tokenizers.schemes",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
