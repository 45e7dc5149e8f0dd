"""celltron.training: the Lightning machinery every run shares, pretraining and fine-tuning alike —
the Trainer (strategies, precision, loggers, resume), the LightningModule, callbacks, atomic
checkpoints, environment checks and the fine-tuning examples loop."""
