from celltron.model_zoo.geneformer.configuration_geneformer import GeneformerConfig
from celltron.model_zoo.geneformer.modeling_geneformer import GeneformerForMaskedLM

__all__ = ["GeneformerConfig", "GeneformerForMaskedLM"]
