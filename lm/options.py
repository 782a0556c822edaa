"""Options declared once: each config node's options are a dataclass whose fields carry their
type, default and rule (`option`), with a one-line docstring below each. `problems` checks a
node's values against them and returns every problem, one line each, so that a command with
several mistakes names them all.

Hydra gets the dataclasses' defaults as the nodes' keys (lm/config.py), untyped: a value of the
wrong type reaches `problems`, which reports it beside the others, rather than stopping Hydra at
the first.

The nodes that build classes we do not own (trainer.*, callbacks.*, logger.*) are not declared
again: `argument_problems` checks their true/false keys against the classes' own annotations.
"""

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

from lm.errors import UserError


class Rule(NamedTuple):
    """What a value must be beyond its type: `valid(value)`, worded for the error as `allowed`
    (which follows the type's words: "an integer" + ", 1 or more")."""

    valid: Callable[[Any], bool]
    allowed: str


def at_least(smallest: float) -> Rule:
    return Rule(lambda value: value >= smallest, f", {smallest} or more")


def above(bound: float) -> Rule:
    return Rule(lambda value: value > bound, f" above {bound}")


def between(low: float, high: float) -> Rule:
    return Rule(lambda value: low <= value <= high, f" in [{low}, {high}]")


FRACTION = Rule(lambda value: 0 <= value < 1, " in [0, 1)")  # a dropout probability
SEED = between(0, 2**32 - 1)  # what Lightning's seed_everything (and NumPy) take


def option(default: Any, rule: Rule | None = None, key: str | None = None) -> Any:
    """A dataclass field: its default and, beyond its type, its rule; `key` is its name in the
    config where that differs (a Python keyword: cache.lambda)."""
    metadata = {"rule": rule, "key": key}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def defaults(options: type) -> dict[str, Any]:
    """The options' defaults: a config node's keys."""
    return {_key(field): _default(field) for field in dataclasses.fields(options)}


def build(options: type, values: Mapping[str, Any]) -> Any:
    """The options dataclass of a node's values, checked already: under the fields' names, Hydra's
    own keys (`_target_`) left out, a list as a list (not Hydra's ListConfig)."""

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value

    fields = dataclasses.fields(options)
    return options(**{field.name: plain(values[_key(field)]) for field in fields if _key(field) in values})


def problems(options: type, values: Mapping[str, Any], prefix: str) -> list[str]:
    """One line for each of `values` that its field's type or rule refuses, and for each key that
    is not an option (keys starting with "_" are Hydra's); `prefix` is the node's path."""
    hints = typing.get_type_hints(options)
    known = {_key(field): field for field in dataclasses.fields(options)}

    def path(key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    lines = [
        f"{path(key)} is not an option; the options are {', '.join(known)}."
        for key in values
        if key not in known and not key.startswith("_")
    ]
    for name, field in known.items():
        value = values.get(name, _default(field))
        rule = field.metadata["rule"]
        kind, accepted = _describe(hints[field.name])
        if not accepted(value) or (rule and value is not None and not rule.valid(value)):
            lines.append(refusal(path(name), value, kind + (rule.allowed if rule else "")))
    return lines


def argument_problems(target: Callable, values: Mapping[str, Any], prefix: str) -> list[str]:
    """One line for each of `values` that `target` (a class we do not own: Lightning's Trainer, a
    callback, a logger) declares true/false (`bool`, `bool | None`, `bool | Literal["warn"]`, ...)
    but is of no type it names: Lightning would take `enable_progress_bar='no'` as true. Its other
    parameters are its own to check; `values` are read (interpolations resolved) only where checked."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # an annotation that does not resolve here: nothing to judge by
        return []
    lines = []
    for name, hint in hints.items():
        choices = _scalar_choices(hint) if name in values else None
        if choices is not None and not choices[1](values[name]):
            lines.append(refusal(f"{prefix}.{name}", values[name], choices[0]))
    return lines


def _scalar_choices(hint: Any) -> tuple[str, Callable[[Any], bool]] | None:
    """A true/false annotation, in words, and whether a value has one of its types; None for an
    annotation without bool, or with a type a config value cannot have (a Logger)."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    members = typing.get_args(hint) if union else (hint,)
    if bool not in members:
        return None
    words, checks = [], []
    for member in members:
        if member is type(None):
            words.append("null")
            checks.append(lambda value: value is None)
        elif member is bool:
            words += ["true", "false"]
            checks.append(lambda value: isinstance(value, bool))
        elif typing.get_origin(member) is Literal:
            choices = typing.get_args(member)
            words += map(str, choices)
            checks.append(choices.__contains__)
        elif member in (int, float, str):
            kind, accepted = _describe(member)
            words.append(kind)
            checks.append(accepted)
        else:
            return None
    return ", ".join(words[:-1]) + " or " + words[-1], lambda value: any(check(value) for check in checks)


def dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config's values by their dotted keys (model.net.hidden_size)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= dotted(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Where files are: a run moved to another folder or machine computes the same.
PATH_KEYS = {"dir", "cache_dir", "url", "dirpath", "save_dir", "default_root_dir"}


def is_setting(key: str) -> bool:
    """Whether a dotted key names what a run computes: not a path, nor how Hydra builds an object
    (`_target_`, `_recursive_`)."""
    name = key.rsplit(".", 1)[-1]
    return name not in PATH_KEYS and not name.startswith("_")


def refusal(key: str, value: Any, allowed: str) -> str:
    """The line that refuses one value."""
    return f"{key}={value!r} is not allowed: it must be {allowed}."


def refuse(lines: Sequence[str]) -> None:
    """One UserError holding every problem, one per line; nothing when there is none."""
    if lines:
        raise UserError("\n".join(lines))


def _key(field: dataclasses.Field) -> str:
    return field.metadata.get("key") or field.name


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _describe(hint: Any) -> tuple[str, Callable[[Any], bool]]:
    """How a type reads in a message, and whether a value from YAML or the command line has it.
    A bool is no number (YAML's true would count as 1); an integer is a number."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:  # X | None
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        kind, accepted = _describe(inner)
        return (
            f"null{', ' if ' or ' in kind else ' or '}{kind}",
            lambda value: value is None or accepted(value),
        )
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        words = ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]
        return words, lambda value: isinstance(value, str) and value in choices
    if typing.get_origin(hint) is list:
        kind, accepted = _describe(typing.get_args(hint)[0])
        return (
            f"a list of {kind.split(' ', 1)[1]}s",
            lambda value: (
                isinstance(value, Sequence) and not isinstance(value, str) and all(map(accepted, value))
            ),
        )
    if hint is bool:
        return "true or false", lambda value: isinstance(value, bool)
    if hint is int:
        return "an integer", lambda value: isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # finite: inf and nan compare as no rule expects (an lr of inf passes ">= 0")
        return (
            "a number",
            lambda value: (
                isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            ),
        )
    if hint is str:
        return "a string", lambda value: isinstance(value, str)
    raise TypeError(f"an option of type {hint} has no check")
