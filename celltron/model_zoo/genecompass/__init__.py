from celltron.model_zoo.genecompass.configuration_genecompass import GeneCompassConfig
from celltron.model_zoo.genecompass.modeling_genecompass import GeneCompassForPretraining, GeneCompassOutput

__all__ = ["GeneCompassConfig", "GeneCompassForPretraining", "GeneCompassOutput"]
