"""The anchored head's weight rule restated for assertions on a written choice."""

from __future__ import annotations


def earned_by_rule(choice: dict) -> float:
    """The weight `report.earned_weight` must have picked from what metrics.json records: the
    smallest weight, unless larger ones have a gain whose lower bound is above 0; then the best
    score of those (the first, i.e. smallest, on ties)."""
    scores, lows = choice["weight_scores"], choice.get("gain_low", {})
    earned = [w for w in scores if lows.get(w) is not None and lows[w] > 0 and scores[w] is not None]
    if not earned:
        return min(float(w) for w in scores)
    best = max(scores[w] for w in earned)
    return min(float(w) for w in earned if scores[w] == best)
