"""`biformer recipes`: the original release's training recipes that `biformer train --recipe` applies."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recipes", help="list the training recipes and every setting they make",
        description="List the original release's training recipes (--recipe NAME of `biformer train`): the task "
                    "and heads each is for, its global batch, the option values it sets (the common ones, then "
                    "those of one head or backbone), and what the options cannot express.",
    )
    parser.add_argument("name", nargs="?", default=None, help="show this recipe only")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import flag
    from ..errors import UserError
    from ..recipes import RECIPES

    if args.name is not None and args.name not in RECIPES:
        raise UserError(f"recipe {args.name!r} is not one of {', '.join(RECIPES)}")
    shown = [RECIPES[args.name]] if args.name else list(RECIPES.values())
    blocks = []
    for recipe in shown:
        defaults = f"; the default of {', '.join(f'{head}_*' for head in recipe.default_for)}" if recipe.default_for else ""
        batch = recipe.settings_all["batch_size"]
        lines = [f"{recipe.name}: {recipe.summary}",
                 f"  {recipe.task} models{defaults}",
                 f"  from {recipe.source}",
                 f"  global batch {batch * recipe.gpus} ({recipe.gpus} GPUs x {batch})"]
        lines += [f"  {flag(name)} {value!r}" for name, value in recipe.settings_all.items()]
        for part, values in recipe.settings_by_part.items():
            lines.append(f"  for {part}: " + ", ".join(f"{flag(name)} {value!r}" for name, value in values.items()))
        lines += [f"  note: {note}" for note in recipe.notes]
        blocks.append("\n".join(lines))
    print("\n\n".join(blocks))
    return 0
