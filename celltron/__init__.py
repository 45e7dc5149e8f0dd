"""celltron: pretraining and fine-tuning single-cell foundation models."""

__version__ = "0.1.0"


def _register_models() -> None:
    """`import celltron` makes transformers' AutoConfig / AutoModel load celltron folders."""
    from celltron.model_zoo.registry import register_auto_classes

    register_auto_classes()


_register_models()
