"""celltron.finetune: tasks on a pretrained model (annotation, embedding, perturbation, GRN, drug response), each beside its baselines."""
