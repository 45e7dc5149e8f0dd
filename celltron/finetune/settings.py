"""The training settings an anchored head chooses by inner cross-validation besides its weight:
the learning rate and the training length. Shared by the tasks whose heads train a model per
inner fold (annotation, perturbation).

A task's config section lists `learning_rates` (empty: optim.lr only) and `step_fractions`
(shares of trainer.max_steps); one run per learning rate gives every length, its predictions
taken as training passes each (`PredictAtSteps`), so lengths cost no extra runs. The plain head
makes no choice: optim.lr and the full length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from celltron.errors import InputError
from celltron.finetune.report import UnitScore, anchor, choose_best, choose_weight, finite_mean
from celltron.training.examples import PredictAtSteps


def learning_rates(section, optim) -> tuple[float, ...]:
    """The learning rates to choose from, in the order given (ties go to the first); optim.lr
    alone when `section.learning_rates` is empty or the head is plain."""
    if section.head != "anchored" or not section.learning_rates:
        return (float(optim.lr),)
    return tuple(dict.fromkeys(float(r) for r in section.learning_rates))


def training_lengths(section, max_steps: int) -> tuple[int, ...]:
    """The training lengths (steps) to choose from: `section.step_fractions` of max_steps, at
    least one step each, ascending; the full length alone for the plain head."""
    if section.head != "anchored":
        return (max_steps,)
    return tuple(sorted({max(1, round(f * max_steps)) for f in section.step_fractions}))


def at_learning_rate(config, lr: float):
    """`config` with optim.lr set to `lr` (the rest of the schedule unchanged)."""
    return replace(config, optim=replace(config.optim, lr=lr))


def run_folder(base: Path, lr: float, rates: tuple[float, ...]) -> Path:
    """Where the run at `lr` goes: `base` itself when there is one learning rate (the folder a
    run without a choice has always used, so --resume finds it), else base/lr<lr>."""
    return base if len(rates) == 1 else base / f"lr{lr:g}"


def setting_name(lr: float, steps: int) -> str:
    return f"lr={lr:g},steps={steps}"


def predictions_by_length(
    train: Callable[[list | None], tuple[object, bool]], predict: Callable[[object], object], max_steps: int, lengths, where: Path
) -> tuple[dict[int, object], bool]:
    """One training run (`train(callbacks)` -> (model, is first process)) and `predict(model)`
    after each of `lengths`: ({steps: predictions}, whether this process is the first)."""
    shorter = sorted(steps for steps in set(lengths) if steps < max_steps)
    snapshots = PredictAtSteps(shorter, predict)
    trained, first = train([snapshots] if shorter else None)
    missing = [steps for steps in shorter if steps not in snapshots.predictions]
    if missing:
        raise InputError(
            f"{where}: no predictions after step(s) {missing}: the run resumed past them or stopped before; "
            "delete the folder's checkpoints and run again"
        )
    by_length = {steps: snapshots.predictions[steps] for steps in shorter}
    if max_steps in lengths:
        by_length[max_steps] = predict(trained)
    return by_length, first


def choose_setting(scores: dict[tuple[float, int], float], higher_is_better: bool = True) -> tuple[float, int, dict]:
    """The (learning rate, length) with the best inner score of the model alone, in the order
    `scores` lists them for ties; returns it and the scores by `setting_name`."""
    named = {setting_name(*key): score for key, score in scores.items()}
    lr, steps = dict(zip(named, scores))[choose_best(named, higher_is_better)]
    return lr, steps, named


class InnerScores:
    """Inner-fold scores, per fold, of the model alone at each (learning rate, length) and of
    each weight's blend with the baseline there; `choose` makes the anchored head's choice.

    Args:
        rates, lengths, weights: the grid (rates and lengths in tie order: first, shorter).
        seed: of the unit resamples behind the weight rule (`report.earned_weight`).
    """

    def __init__(self, rates, lengths, weights, seed: int = 0):
        self.lengths, self.weights, self.seed = tuple(lengths), sorted(set(weights)), seed
        self.alone = {(lr, steps): [] for lr in rates for steps in lengths}
        self.blended = {(lr, steps, w): [] for lr, steps in self.alone for w in self.weights}

    def add(self, lr: float, by_length: dict, baseline, score: Callable[[object], UnitScore]) -> None:
        """One inner fold's model at `lr` ({steps: predictions}) scored alone and blended with
        the fold's `baseline` predictions; `score(predictions)` -> the headline over the fold's
        held-out units, as a `UnitScore` (higher or lower is better as `choose` is told)."""
        for steps, model in by_length.items():
            self.alone[lr, steps].append(score(model).value)
            for w in self.weights:
                self.blended[lr, steps, w].append(score(anchor(baseline, model, w)))

    def choose(self, higher_is_better: bool = True) -> dict:
        """{"learning_rate", "steps", "setting_scores", "weight", "weight_scores", "gain_low"}: the
        setting whose model alone has the best mean inner score (ties: the first rate, the
        shorter length; folds without a finite score are left out of a mean), then the weight by
        `report.earned_weight` over the blends there: the smallest unless a larger one gains
        beyond the interval over resampled inner held-out units."""
        lr, steps, setting_scores = choose_setting({key: finite_mean(v) for key, v in self.alone.items()}, higher_is_better)
        by_weight = {w: self.blended[lr, steps, w] for w in self.weights}
        return {"learning_rate": lr, "steps": steps, "setting_scores": setting_scores} | choose_weight(
            by_weight, higher_is_better, seed=self.seed
        )
