from celltron.model_zoo.scgpt.configuration_scgpt import ScGPTConfig
from celltron.model_zoo.scgpt.modeling_scgpt import ScGPTModel, ScGPTOutput

__all__ = ["ScGPTConfig", "ScGPTModel", "ScGPTOutput"]
