"""What several commands share: argparse types for counts, and the check that a task-specific option is set only
for a model of a task that takes it."""
from __future__ import annotations

import argparse

from ..errors import UserError


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


def check_task_options(args: argparse.Namespace, task, accepted: frozenset[str], command: str) -> None:
    """UserError naming the task-specific options given away from their defaults that `task` does not take."""
    from ..tasks.registry import TASKS

    defaults = args.task_option_defaults
    given = [dest for dest in defaults if getattr(args, dest) != defaults[dest]]
    refused = [dest for dest in given if dest not in accepted]
    if refused:
        def takers(dest: str) -> str:
            names = [other.name for other in TASKS if dest in getattr(other, f"{command}_options")]
            return " and ".join(names) or "no"
        raise UserError("; ".join(f"--{dest.replace('_', '-')} is for {takers(dest)} models" for dest in refused)
                        + f": leave it out for {task.name} model {args.model or 'of --checkpoint'}")


def record_defaults(parser: argparse.ArgumentParser, task_options: tuple[str, ...]) -> None:
    """Keep the defaults of the command's task-specific options (argparse dests; each task lists those it takes)
    in the parsed arguments, for `check_task_options`."""
    parser.set_defaults(task_option_defaults={dest: parser.get_default(dest) for dest in task_options})
