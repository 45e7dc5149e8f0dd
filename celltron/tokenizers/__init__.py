"""Token vocabularies and tokenizers: rank-value (Geneformer); more schemes follow (issue 3)."""

from celltron.tokenizers.rank_value import RaggedTokens, RankValueTokenizer
from celltron.tokenizers.vocab import GeneVocab

__all__ = ["GeneVocab", "RaggedTokens", "RankValueTokenizer"]
