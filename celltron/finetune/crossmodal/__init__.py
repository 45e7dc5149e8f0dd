"""Cross-modal tasks on paired cells: predict one modality from another, align them, annotate with both."""
