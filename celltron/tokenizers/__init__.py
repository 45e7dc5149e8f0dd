"""Token vocabularies and tokenizers: rank-value (Geneformer), expression-binned (scGPT),
cross-species ortholog (GeneCompass-style)."""

from celltron.tokenizers.binned import BinnedTokenizer
from celltron.tokenizers.ortholog import OrthologTokenizer, ortholog_vocab
from celltron.tokenizers.ragged import RaggedTokens
from celltron.tokenizers.rank_value import RankValueTokenizer
from celltron.tokenizers.vocab import GeneVocab

__all__ = ["BinnedTokenizer", "GeneVocab", "OrthologTokenizer", "RaggedTokens", "RankValueTokenizer", "ortholog_vocab"]
