"""celltron.lab: a lab's own AnnData — reading and gene mapping, tokenising for a model,
inference helpers (device, precision, padding) and `embed`, the cell and gene embeddings."""
