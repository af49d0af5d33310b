"""Subcommands of the `biformer` command line.

Each module here defines `register(subparsers)`, which adds its subparser and sets
`run=<function(args) -> int>` as a default. Raise `biformer.errors.UserError` for mistakes the
user can fix (bad path, wrong model for a checkpoint, ...): the CLI prints its message and exits
with 2. Modules import their heavy dependencies (torch, timm) inside `run`, so that
`biformer --help` stays fast.
"""
