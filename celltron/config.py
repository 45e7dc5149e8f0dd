"""One typed-YAML loader for every celltron config, and the command-line options made from it.

A config is a dataclass: either flat (corpus build options, a cluster spec) or made of sections,
each a dataclass (pretraining, fine-tuning). Every field declares its type, its default, its
allowed range (`ranged`) or choices (`one_of`), and a line of the class docstring
(`name: what it means`). From that one declaration come:
- loading YAML, with values coerced to the declared type (YAML reads `3e-4` as a string) and
  unknown sections or fields refused, naming the file and the known ones;
- `--set section.field=value` overrides;
- command-line options (`add_options`): type, range, choices and help taken from the field, so
  a flag can never disagree with the config it sets.
Errors name the file (or flag), the section and field, and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from dataclasses import dataclass, fields

from celltron.errors import ConfigError
from celltron.inputs import parse_yaml, read_yaml
from celltron.ranges import check_ranges, number


def one_of(default, choices) -> dataclasses.Field:
    """A dataclass field whose value must be one of `choices` (None is left to the field's type)."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


def check_fields(obj, where: str) -> None:
    """Every ranged field of the dataclass `obj` in its range, every `one_of` field among its choices."""
    check_ranges(obj, where)
    for spec in fields(obj):
        choices = spec.metadata.get("choices")
        value = getattr(obj, spec.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"{where} {spec.name}: {value!r} is not one of {', '.join(map(str, choices))}")


def check_sections(config, where: str) -> None:
    """check_fields on every section of a sectioned config."""
    for spec in fields(config):
        check_fields(getattr(config, spec.name), f"{where} [{spec.name}]")


def _kinds(annotation: str) -> list[str]:
    """'int | None' -> ['int', 'None']; 'tuple[str, ...]' -> ['tuple']."""
    return [kind.strip().split("[")[0] for kind in str(annotation).split("|")]


def _inner(annotation: str, kind: str) -> list[str]:
    """The types inside `kind[...]`: 'tuple[int, ...]' -> ['int', '...']; 'dict[str, float]' -> ['str', 'float']."""
    found = re.search(rf"\b{kind}\[([^\]]*)\]", str(annotation))
    return [part.strip() for part in found.group(1).split(",")] if found else []


def coerce(value, annotation: str, where: str):
    """A YAML (or flag) value as the field's declared type, or a ConfigError naming `where`."""
    kinds = _kinds(annotation)
    if value is None and "None" in kinds:
        return None
    if "bool" in kinds:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
    for kind, convert in (("int", int), ("float", float)):
        if kind in kinds and not isinstance(value, bool):
            try:
                converted = convert(value)
            except (TypeError, ValueError):
                continue
            if kind == "int" and isinstance(value, float) and converted != value:
                continue
            return converted
    if "str" in kinds and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    for kind, container in (("tuple", tuple), ("list", list)):
        if kind in kinds and (isinstance(value, (list, tuple)) or value is None):  # YAML `key:` (null): empty
            element = (_inner(annotation, kind) or [None])[0]
            items = enumerate(value or ())
            return container(coerce(item, element, f"{where}[{i}]") if element else item for i, item in items)
    if "dict" in kinds and isinstance(value, dict):
        inner = _inner(annotation, "dict")
        return {key: coerce(item, inner[1], f"{where}[{key!r}]") if len(inner) == 2 else item for key, item in value.items()}
    raise ConfigError(f"{where}: {value!r} is not a valid {annotation}")


def typed(cls, values: dict, where: str):
    """A flat dataclass from a mapping of field names, each value coerced to its field's type."""
    declared = {spec.name: str(spec.type) for spec in fields(cls)}
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(declared)}")
    coerced = {name: coerce(value, declared[name], f"{where} {name}") for name, value in values.items()}
    check_ranges(cls, where, coerced)  # before building: a dataclass that checks itself names `where` too
    return cls(**coerced)


def read_mapping(path, what: str, of: str = "fields") -> dict:
    """A YAML file that must hold a mapping of `of` (an empty file is an empty mapping)."""
    values = read_yaml(path, what) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of {of}, got {type(values).__name__}; see {what}")
    return values


def load_flat(cls, path, what: str, of: str = "fields"):
    """A flat config from YAML; unknown fields refused, values coerced to the fields' types."""
    return typed(cls, read_mapping(path, what, of), str(path))


def section_classes(config_class) -> dict[str, type]:
    return typing.get_type_hints(config_class)


def from_dict(config_class, values: dict, where: str = "config"):
    """A sectioned config from a mapping of sections (missing sections: their defaults), checked."""
    classes = section_classes(config_class)
    unknown = sorted(set(values) - set(classes))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {sorted(classes)}")
    for name, section in values.items():
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{where} [{name}]: expected a mapping of fields, got {type(section).__name__} {section!r}")
    built = {name: typed(cls, dict(values.get(name) or {}), f"{where} [{name}]") for name, cls in classes.items()}
    return config_class(**built).check(where)


def load_config(config_class, path, overrides: list[str] | None = None):
    """A sectioned config from YAML, with `section.field=value` overrides (values parsed as YAML)."""
    values = read_mapping(path, "config file (see configs/)", "sections")
    return from_dict(config_class, apply_overrides(values, overrides), str(path))


def apply_overrides(values: dict, overrides: list[str] | None) -> dict:
    """`section.field=value` items (values parsed as YAML) set into a mapping of sections."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.field=value (e.g. optim.lr=3e-4)")
        section, _, name = key.partition(".")
        if values.get(section) is None:  # absent, or an empty `section:` line in the YAML
            values[section] = {}
        target = values[section]
        if not isinstance(target, dict):
            raise ConfigError(f"--set {item!r}: [{section}] is {target!r} in the config, not a mapping of fields")
        *parents, leaf = name.split(".")
        for parent in parents:  # e.g. model.overrides.hidden_size=64
            target = target.setdefault(parent, {})
        target[leaf] = parse_yaml(raw, f"--set {item}")
    return values


def replace(config, where: str = "config", **sections):
    """A copy with some fields of some sections changed (values coerced to the fields' types), checked:
    replace(c, trainer={"max_steps": 5})."""
    changed = {}
    for name, values in sections.items():
        section = getattr(config, name)
        declared = {spec.name: str(spec.type) for spec in fields(section)}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise ConfigError(f"{where} [{name}]: unknown field(s) {unknown}; known: {sorted(declared)}")
        coerced = {key: coerce(value, declared[key], f"{where} [{name}] {key}") for key, value in values.items()}
        changed[name] = dataclasses.replace(section, **coerced)
    return dataclasses.replace(config, **changed).check(where)


# ---- command-line options made from the fields -------------------------------------------------


@dataclass(frozen=True)
class Option:
    """A command-line option that sets one config field.

    field: 'section.name' (sectioned configs) or 'name' (flat ones); '{task}.name' is resolved
        per run by `given_values(..., task=...)`, its type taken from the first of `sections`.
    flag: the option's name (default: --name, underscores as dashes).
    help: what to show (default: the field's line of its class docstring).
    sections: the sections a '{task}' field may resolve to (a task without the field: the first).
    """

    field: str
    flag: str | None = None
    help: str | None = None
    metavar: str | None = None
    sections: tuple[str, ...] = ()
    type: typing.Callable | None = None  # an argparse type= instead of the one made from the field
    choices: tuple | None = None  # a narrower set than the field's (what this command supports)

    @property
    def name(self) -> str:
        return self.field.rpartition(".")[2]

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return "config__" + self.field.replace("{", "").replace("}", "").replace(".", "__")


def field_docs(cls) -> dict[str, str]:
    """Each field's description from the class docstring, written `name: text` (or `a, b: text`,
    `a / b: text`), at the start of a line or after a sentence."""
    doc = "\n".join(line.strip() for line in (cls.__doc__ or "").splitlines())
    names = {spec.name for spec in fields(cls)}
    label = r"(?:^|(?<=\. ))((?:\w+(?:[ \t]*[,/][ \t]*|[ \t]+))*\w+):\s"
    found = [(m, [n.strip() for n in re.split(r"[,/\s]+", m.group(1)) if n.strip()]) for m in re.finditer(label, doc, re.M)]
    found = [(m, labels) for m, labels in found if labels and set(labels) <= names]
    docs = {}
    for i, (match, labels) in enumerate(found):
        end = found[i + 1][0].start() if i + 1 < len(found) else len(doc)
        text = " ".join(doc[match.end() : end].split())
        for name in labels:
            docs[name] = text
    return docs


def _field_spec(config_class, option: Option) -> tuple[type, dataclasses.Field, str]:
    """(class holding the field, the field, 'section.name' or 'name' for messages)."""
    section, _, name = option.field.rpartition(".")
    holder = config_class
    if section:
        section = option.sections[0] if section == "{task}" else section
        holder = section_classes(config_class)[section]
    spec = next((s for s in fields(holder) if s.name == name), None)
    if spec is None:
        raise ValueError(f"option {option.field}: {holder.__name__} has no field {name!r}")
    return holder, spec, f"{section}.{name}" if section else name


def _option_type(spec: dataclasses.Field, kinds: list[str]):
    allowed = spec.metadata.get("range")
    for kind, convert in (("int", int), ("float", float)):
        if kind in kinds and "str" not in kinds:  # a number or a word (devices: 'auto'): Option.type says
            return convert if allowed is None else number(convert, allowed.text)
    return str


def add_options(parser, config_class, options: list[Option]) -> None:
    """argparse options for `options`: type, range, choices and help from each field. Every option
    defaults to None (not given), so the config file's value stands unless the flag is given."""
    for option in options:
        holder, spec, label = _field_spec(config_class, option)
        kinds = _kinds(spec.type)
        kwargs = {"dest": option.dest, "default": None}
        help_text = option.help or field_docs(holder).get(spec.name, "")
        if "bool" in kinds:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if "tuple" in kinds or "list" in kinds:
                kwargs["nargs"] = "*"  # none at all: empty (e.g. no obs columns kept)
                element = re.search(r"\[(\w+)", str(spec.type))
                kinds = [element.group(1)] if element else ["str"]
            choices = list(option.choices) if option.choices else _choices(config_class, option, spec)
            if choices:
                kwargs["choices"] = choices
            kwargs["type"] = option.type or _option_type(spec, kinds)
            kwargs["metavar"] = None if choices else option.metavar or spec.name.upper()
        sets = " / ".join(f"{section}.{spec.name}" for section in option.sections) if option.sections else label
        # a sectioned config's defaults come from its YAML file; a flat one's are the field's own
        default = "" if "." in option.field else _default_text(spec)
        kwargs["help"] = f"{help_text} (config: {sets}{default})".replace("%", "%%")
        parser.add_argument(option.flag_name, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})


def _default_text(spec: dataclasses.Field) -> str:
    if spec.default is not dataclasses.MISSING:
        value = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        value = spec.default_factory()
    else:
        return ""
    return "" if value in (None, (), {}, [], "") else f"; default {value}"


def _choices(config_class, option: Option, spec: dataclasses.Field) -> list | None:
    """The field's choices; for a '{task}' field, those of every section it may resolve to."""
    if not option.sections:
        return [c for c in spec.metadata.get("choices", ()) if c is not None] or None
    union = []
    for section in option.sections:
        holder = section_classes(config_class)[section]
        field_spec = next((s for s in fields(holder) if s.name == option.name), None)
        union += [c for c in (field_spec.metadata.get("choices", ()) if field_spec else ()) if c not in union and c != ""]
    return union or None


def given_values(args, options: list[Option], task: str | None = None) -> dict:
    """The options given on the command line: {section: {field: value}} (sectioned configs) or
    {field: value} (flat ones, fields without a section)."""
    given: dict = {}
    for option in options:
        value = getattr(args, option.dest, None)
        if value is None:
            continue
        section, _, name = option.field.rpartition(".")
        if not section:
            given[name] = tuple(value) if isinstance(value, list) else value
            continue
        if section == "{task}":
            if task not in option.sections:
                raise ConfigError(f"{option.flag_name} does not apply to {task}; it sets {' / '.join(option.sections)}")
            section = task
        given.setdefault(section, {})[name] = tuple(value) if isinstance(value, list) else value
    return given
