"""Perturbation response: the head (model.py), the task (run.py), data, splits and metrics
(evaluate.py) and the baselines every model is reported beside (baselines.py)."""
