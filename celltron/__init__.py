"""celltron: pretraining and fine-tuning single-cell foundation models."""

__version__ = "0.1.0"
