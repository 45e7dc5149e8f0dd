"""Allowed ranges of numeric options, written once beside each field (`ranged(8, ">= 1")`) and
checked wherever a value enters: config files, `--set`, command-line flags and library calls.

A range is spelt as the user reads it in the error: '> 0', '>= 1', '[0, 1)', '(0, 1)', '[1, 65535]'.
NaN and infinities are refused everywhere: no option of celltron means anything with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass
from numbers import Real

from celltron.errors import ConfigError

_BOUND = re.compile(r"^(>=|>)\s*(\S+)$")
_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")


@dataclass(frozen=True)
class Range:
    """An interval of allowed numbers and its spelling (`text`, shown in errors)."""

    text: str
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def parse(cls, text: str) -> Range:
        bound = _BOUND.match(text)
        if bound:
            return cls(text, low=float(bound.group(2)), low_open=bound.group(1) == ">")
        interval = _INTERVAL.match(text)
        if not interval:
            raise ValueError(f"range {text!r}: write '> A', '>= A' or an interval such as '[A, B)'")
        opening, low, high, closing = interval.groups()
        return cls(text, float(low), float(high), low_open=opening == "(", high_open=closing == ")")

    def allows(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return self.text


def ranged(default=dataclasses.MISSING, allowed: str = "", **kwargs):
    """A dataclass field whose numbers must lie in `allowed` (each element of a tuple, each
    value of a dict; None is left to the field's type)."""
    return dataclasses.field(default=default, metadata={"range": Range.parse(allowed)}, **kwargs)


def check_number(value, allowed: Range, where: str):
    """`value` when it is a finite number in `allowed`; otherwise a one-line ConfigError naming
    `where` (file, section and field, or the flag), the value and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"{where}: {value!r} is not a number; allowed: {allowed}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number; allowed: {allowed}")
    if not allowed.allows(value):
        raise ConfigError(f"{where}: {value!r} is out of range; allowed: {allowed}")
    return value


def check_ranges(obj, where: str, values: dict | None = None) -> None:
    """Check every ranged field of the dataclass `obj`: its own values, or those of the mapping
    `values` (field name -> value, checked before the dataclass is built from them)."""
    for spec in dataclasses.fields(obj):
        allowed = spec.metadata.get("range")
        if allowed is None:
            continue
        value = values.get(spec.name) if values is not None else getattr(obj, spec.name)
        for label, item in _items(value, f"{where} {spec.name}"):
            if item is None or (isinstance(item, str) and "str" in str(spec.type)):
                continue  # None, and words such as devices: auto, are the field type's business
            check_number(item, allowed, label)


def _items(value, where: str) -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [(f"{where}[{key!r}]", item) for key, item in value.items()]
    if isinstance(value, (list, tuple)):
        return [(where, item) for item in value]
    return [(where, value)]


def number(kind: type, allowed: str):
    """An argparse `type=`: the text as `kind` (int or float) in `allowed`, or argparse's one-line
    usage error naming the flag, the value and the range."""
    bounds = Range.parse(allowed)

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}; allowed: {bounds}") from None
        try:
            return check_number(value, bounds, "value")
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix("value: ")) from None

    convert.__name__ = f"{kind.__name__} {allowed}"
    return convert


def name_weight(text: str) -> tuple[str, float]:
    """An argparse `type=` for `NAME=W` (a sampling weight): a finite number > 0."""
    name, sep, weight = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=W, e.g. pbmc.h5ad=0.5")
    try:
        return name, number(float, "> 0")(weight)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{name}={weight}: {error}") from None


def devices(text: str) -> str:
    """An argparse `type=` for --devices: 'auto' or a whole number >= 1 (kept as text)."""
    if text != "auto":
        number(int, ">= 1")(text)
    return text
