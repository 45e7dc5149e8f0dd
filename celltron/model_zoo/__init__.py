"""Model families as Hugging Face PreTrainedModels: geneformer, scgpt, genecompass."""

from celltron.model_zoo.registry import (
    FAMILIES,
    build_config,
    build_model,
    list_models,
    register_auto_classes,
    register_family,
    registered_family,
    unregister_family,
)
from celltron.model_zoo.spec import EncoderParts, Family

__all__ = [
    "FAMILIES",
    "EncoderParts",
    "Family",
    "build_config",
    "build_model",
    "list_models",
    "register_auto_classes",
    "register_family",
    "registered_family",
    "unregister_family",
]
