"""Model families as Hugging Face PreTrainedModels: geneformer, scgpt, genecompass."""

from celltron.model_zoo.registry import FAMILIES, build_config, build_model, list_models, register_auto_classes

__all__ = ["FAMILIES", "build_config", "build_model", "list_models", "register_auto_classes"]
