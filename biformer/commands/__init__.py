"""Subcommands of the `biformer` command line.

Each module here defines `register(subparsers)`, which adds its subparser and sets
`run=<function(args) -> int>` as a default. Raise `UserError` for mistakes the user can fix
(bad path, wrong model for a checkpoint, ...): the CLI prints its message and exits with 2.
"""


class UserError(Exception):
    """An error caused by the user's input; reported as one line, without a traceback."""
