"""Token vocabularies and tokenizers: rank-value (Geneformer), expression-binned (scGPT),
cross-species ortholog (GeneCompass-style); scGPT's highly-variable-gene selection (scanpy's
flavors, in memory or streamed over blocks) for the binned tokenizer's `genes_subset`."""

from celltron.tokenizers.binned import BinnedTokenizer
from celltron.tokenizers.hvg import HighlyVariableGenes, highly_variable_genes
from celltron.tokenizers.ortholog import OrthologTokenizer, ortholog_vocab
from celltron.tokenizers.ragged import RaggedTokens
from celltron.tokenizers.rank_value import RankValueTokenizer
from celltron.tokenizers.vocab import GeneVocab

__all__ = [
    "BinnedTokenizer",
    "GeneVocab",
    "HighlyVariableGenes",
    "OrthologTokenizer",
    "RaggedTokens",
    "RankValueTokenizer",
    "highly_variable_genes",
    "ortholog_vocab",
]
