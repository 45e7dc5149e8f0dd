"""Model families as Hugging Face PreTrainedModels: geneformer so far (issue 4 adds scgpt, genecompass)."""
