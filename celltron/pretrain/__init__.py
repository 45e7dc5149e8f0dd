"""celltron.pretrain: pretraining a model family on a corpus from a config — the typed config, token
batches from the corpus stream, the run (pretrain, then export to a Hugging Face folder), the demo."""
