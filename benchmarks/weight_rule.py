"""Which rule should pick the anchored head's weight? Two rules on simulated tasks with known answers.

    python -m benchmarks.weight_rule [--replicates 400] [--seed 0]

An anchored head predicts baseline + w x (model − baseline), w chosen from a grid (0, 0.25, 0.5,
0.75, 1) on inner held-out units of the training data; the issue's goal is that on held-out
units the head is never worse than the baseline beyond its interval. The rules:

- `best`: the weight with the best inner score (ties: the smaller);
- `earned` (`report.earned_weight`): w = 0 unless a larger weight gains over it beyond the 95%
  interval of the paired gain over resampled inner units; then the best of those.

Each unit (a perturbation, a drug) has a true profile y of 20 values; the baseline predicts
y + e_b (unit-variance errors). The score of a prediction is its Pearson correlation with the
profile as measured, y + e_t, averaged over units: measurement noise 0 scores against y itself,
2 against a noisy measurement (per-unit scores around 0.3, as on Papalexi's perturbations).
Scenarios (the model's prediction):

- `noise`: the baseline plus independent noise as large as its error (the model knows nothing
  the baseline does not; the right weight is 0);
- `slight_noise`: the same with noise a third as large (a small loss at every w > 0);
- `informative`: y + e_m, errors independent of the baseline's and as large (right weight ~0.5);
- `weak`: y + e_m with errors twice the baseline's (a small gain at w ~0.2);
- `mostly_noise`: per unit, the model is informative with odds 1 in 4, else noise (units
  differ; a small gain at low weights, a loss at high ones);
- `hard_units`: as `informative`, but each unit's error scales vary tenfold.

Per replicate: `inner` units choose the weight (the model is fixed: a simulation of the choice,
not of training), `outer` new units of the same scenario judge it, with the percentile bootstrap
interval of the paired per-unit difference (`report.mean_interval`) the benchmarks print. Both
rules see the same units. Printed per scenario, unit count and rule: how often the head is
worse than the baseline beyond its interval, how often it adds signal beyond it, the mean
held-out gain, and the mean chosen weight.

Decision rule, stated before the run: adopt the rule whose rate of "worse beyond the interval"
stays at or below 2.5% in every scenario and size (a 95% interval lies wholly below a true
difference of zero in 2.5% of replicates), and among those the one that keeps more of the gain
in the informative scenarios.
"""

from __future__ import annotations

import argparse

import numpy as np

from celltron.finetune.report import UnitScore, choose_best, choose_weight, mean_interval

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
GENES = 20
SCENARIOS = ("noise", "slight_noise", "informative", "weak", "mostly_noise", "hard_units")
MEASUREMENT = (0.0, 2.0)  # sd of the measurement noise of the profiles scored against
SIZES = ((15, 15), (60, 60), (240, 240))  # (inner units, outer units): Papalexi-like to GDSC-drug-like


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def simulate(scenario: str, n_units: int, measurement: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(measured truth, baseline, model) predictions, each (n_units, GENES)."""
    truth = rng.normal(size=(n_units, GENES))
    scale = np.exp(rng.uniform(np.log(0.3), np.log(3.0), (n_units, 1))) if scenario == "hard_units" else 1.0
    baseline = truth + scale * rng.normal(size=truth.shape)
    independent = truth + scale * rng.normal(size=truth.shape)
    noise = baseline + rng.normal(size=truth.shape)
    measured = truth + measurement * rng.normal(size=truth.shape)
    if scenario == "noise":
        model = noise
    elif scenario == "slight_noise":
        model = baseline + rng.normal(size=truth.shape) / 3
    elif scenario in ("informative", "hard_units"):
        model = independent
    elif scenario == "weak":
        model = truth + 2.0 * rng.normal(size=truth.shape)
    elif scenario == "mostly_noise":
        model = np.where(rng.random((n_units, 1)) < 0.25, independent, noise)
    else:
        raise ValueError(f"unknown scenario {scenario!r}; one of {SCENARIOS}")
    return measured, baseline, model


def per_unit_scores(truth, baseline, model) -> dict[float, np.ndarray]:
    return {w: _pearson_rows(baseline + w * (model - baseline), truth) for w in WEIGHTS}


def choose(rule: str, scores: dict[float, np.ndarray], seed: int) -> float:
    if rule == "best":
        return float(choose_best({str(w): float(v.mean()) for w, v in scores.items()}))
    return choose_weight({w: [UnitScore.of_units(v)] for w, v in scores.items()}, seed=seed)["weight"]


def run(replicates: int, seed: int) -> list[dict]:
    rows = []
    for measurement in MEASUREMENT:
        for scenario in SCENARIOS:
            for n_inner, n_outer in SIZES:
                rng = np.random.default_rng([seed, int(measurement * 10), SCENARIOS.index(scenario), n_inner])
                tally = {rule: {"worse": 0, "adds": 0, "gain": [], "weight": []} for rule in ("best", "earned")}
                for replicate in range(replicates):
                    inner = per_unit_scores(*simulate(scenario, n_inner, measurement, rng))
                    outer = per_unit_scores(*simulate(scenario, n_outer, measurement, rng))
                    for rule, counts in tally.items():
                        w = choose(rule, inner, seed=[seed, replicate])
                        d = mean_interval(outer[w] - outer[0.0], seed=replicate)
                        counts["worse"] += d["high"] < 0
                        counts["adds"] += d["low"] > 0
                        counts["gain"].append(d["mean"])
                        counts["weight"].append(w)
                for rule, counts in tally.items():
                    rows.append(
                        {
                            "measurement": measurement,
                            "scenario": scenario,
                            "units": f"{n_inner} / {n_outer}",
                            "rule": rule,
                            "worse": counts["worse"] / replicates,
                            "adds": counts["adds"] / replicates,
                            "gain": float(np.mean(counts["gain"])),
                            "weight": float(np.mean(counts["weight"])),
                        }
                    )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = run(args.replicates, args.seed)
    print(f"{args.replicates} replicates per row; weights {WEIGHTS}; Pearson over {GENES} values per unit")
    print(
        "| measurement noise | scenario | inner / outer units | rule | worse beyond interval | adds beyond interval | mean held-out gain | mean w |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['measurement']:g} | {r['scenario']} | {r['units']} | {r['rule']} | {r['worse']:.1%} | {r['adds']:.1%} "
            f"| {r['gain']:+.4f} | {r['weight']:.2f} |"
        )


if __name__ == "__main__":
    main()
