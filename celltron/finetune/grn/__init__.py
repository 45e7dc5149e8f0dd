"""Gene regulatory network inference: the model's edge scores (run.py) and their evaluation
against a reference network beside co-expression and tree baselines (evaluate.py)."""
