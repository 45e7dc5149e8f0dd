"""celltron.hub: publishing a trained or converted model to the Hugging Face Hub (or a folder),
with its model card."""
