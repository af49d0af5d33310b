"""The `biformer` command line: every public module in `biformer.commands` adds one subcommand."""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from . import commands
from .errors import UserError


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand. A command module's `add_task_options(parser)`, whose options the tasks
    declare (importing them imports timm and torchvision), runs only for the command that `argv` names, so that
    `biformer --help` and the other commands answer without them."""
    parser = argparse.ArgumentParser(prog="biformer", description="BiFormer: train, evaluate, analyse, convert.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    named = next((word for word in argv or () if not word.startswith("-")), None)
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):  # shared helpers, not commands
            continue
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
        module.register(subparsers)
        if module_info.name == named and hasattr(module, "add_task_options"):
            module.add_task_options(subparsers.choices[named])
    return parser


def user_message(error: UserError) -> str:
    """The error's own message. A DataLoader worker's exception reaches the main process re-raised with the
    worker's traceback as its message, whose last line is "<module>.<class>: <the message>"."""
    text = str(error)
    if "Original Traceback" in text:
        marker = f"{type(error).__module__}.{type(error).__qualname__}: "
        lines = [line for line in text.splitlines() if line.startswith(marker)]
        if lines:
            return lines[-1][len(marker):]
    return text


def expand_home(args: argparse.Namespace) -> argparse.Namespace:
    """Every value (or list item) starting with ~ as the path it names: the shell expands ~ at a word's start only,
    so --data=~/x and --checkpoint=~/x.safetensors arrive unexpanded."""
    def expanded(value):
        if isinstance(value, (str, os.PathLike)) and os.fspath(value).startswith("~"):
            return type(value)(os.path.expanduser(os.fspath(value)))
        return [expanded(item) for item in value] if isinstance(value, list) else value

    for name, value in vars(args).items():
        setattr(args, name, expanded(value))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = expand_home(build_parser(argv).parse_args(argv))
    try:
        return args.run(args) or 0
    except UserError as error:
        # user mistakes get one clear line, not a traceback
        print(f"biformer {args.command}: error: {user_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"biformer {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`biformer predict ... | head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush cannot fail again
        return 141  # 128 + SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
