"""celltron.model_zoo: see ../shared/DESIGN.md; filled in by its issue."""
