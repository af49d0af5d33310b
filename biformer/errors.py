"""Exceptions shared by the library and the command line (this module imports nothing of ours)."""


class UserError(Exception):
    """A mistake the user can fix from the message alone (bad path, option, data or checkpoint).

    Library functions raise it for input they cannot use; the command line prints the message as
    one line and exits with status 2, without a traceback.
    """


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used: corrupt, unsafe to unpickle, or made for another model."""


class OutputError(UserError, OSError):
    """An output file that cannot be written (missing or read-only folder, full disk)."""
