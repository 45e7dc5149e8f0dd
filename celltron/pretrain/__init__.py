"""celltron.pretrain: Lightning pretraining of a model family on a corpus, from a config; checkpoints, export and Hub publishing."""
