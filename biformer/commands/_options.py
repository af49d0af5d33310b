"""What several commands share: argparse types for counts, parser arguments generated from the fields of an
options dataclass (`biformer.config.option`), and the task-specific options of `eval` and `predict`, generated
from every registered task's `EvalOptions` / `PredictOptions`."""
from __future__ import annotations

import argparse
import typing
from dataclasses import Field, fields
from typing import Any

from ..config import Unset, flag
from ..errors import UserError


def says_default(text: str, default: Any) -> bool:
    """Whether an option's help gets "(default: ...)": not where the help says it already, nor for None, off, an
    empty tuple or a default left out of the parsed arguments (identity tests: 0 == False)."""
    return not ("default" in text or default is None or default is False or default is argparse.SUPPRESS
                or (isinstance(default, tuple) and not default))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, once (`says_default`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return super()._get_help_string(action) if action.option_strings and says_default(text, action.default) \
            else text


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def add_field(group: Any, spec: Field, hint: Any) -> None:
    """One argument of `group` for an options dataclass field: a switch for a bool, else a value of its type. Its
    default is left out of the parsed arguments (so that the caller sees what was typed) and said in the help."""
    if hint is bool:  # on by default, or a recipe may switch it on (an Unset default): --no-NAME switches it off
        switch_off = isinstance(spec.default, Unset) or spec.default
        parsing = {"action": argparse.BooleanOptionalAction if switch_off else "store_true"}
    else:  # the value type of `X | None` and of `tuple[X, ...]` (several values: nargs)
        kind = next(kind for kind in typing.get_args(hint) or (hint,) if kind is not type(None))
        parsing = {"type": typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind}
    default, text = spec.default, spec.metadata["help"]
    if says_default(text, default):
        text += f" (default: {default})"
    group.add_argument(flag(spec.name), default=argparse.SUPPRESS, help=text, **parsing, **spec.metadata["cli"])


def add_fields(group: Any, options: type) -> None:
    """An argument per field of the options dataclass `options`."""
    hints = typing.get_type_hints(options)
    for spec in fields(options):
        if spec.init:
            add_field(group, spec, hints[spec.name])


def typed_fields(args: argparse.Namespace, options: type) -> dict[str, Any]:
    """The fields of `options` that the command line gave (those `add_field` made and the user typed)."""
    return {spec.name: getattr(args, spec.name) for spec in fields(options) if spec.init and hasattr(args, spec.name)}


def _task_fields(command: str) -> dict[str, tuple[Field, Any, list[str]]]:
    """Each task-specific option of `command` ("eval" or "predict") by name: its field, type and the tasks that
    take it (in the task list's order; the first declaration gives the help)."""
    from ..tasks.registry import TASKS

    options: dict[str, tuple[Field, Any, list[str]]] = {}
    for task in TASKS:
        declared = task.options_type(command)
        hints = typing.get_type_hints(declared)
        for spec in fields(declared):
            options.setdefault(spec.name, (spec, hints[spec.name], []))[2].append(task.name)
    return options


def add_task_option_groups(parser: argparse.ArgumentParser, command: str) -> None:
    """A group per set of tasks with the options they take."""
    groups: dict[tuple[str, ...], Any] = {}
    for spec, hint, takers in _task_fields(command).values():
        key = tuple(takers)
        if key not in groups:
            groups[key] = parser.add_argument_group(" and ".join(takers) + " models")
        add_field(groups[key], spec, hint)


def task_options(args: argparse.Namespace, task: Any, command: str) -> Any:
    """The task's typed options of `command` from the parsed arguments; UserError naming any option given that
    belongs to other tasks."""
    declared = task.options_type(command)
    accepted = {spec.name for spec in fields(declared)}
    takers = _task_fields(command)
    given = {name: getattr(args, name) for name in takers if hasattr(args, name)}
    refused = [name for name in given if name not in accepted]
    if refused:
        raise UserError("; ".join(f"{flag(name)} is for {' and '.join(takers[name][2])} models" for name in refused)
                        + f": leave it out for {task.name} model {args.model or 'of --checkpoint'}")
    return declared(**given)
