"""The exception types for bad user input; the CLI turns them into one line and exit code 2."""

import sys
from collections.abc import Callable

EXIT_USAGE = 2  # bad input: flags, checkpoint, prompts


class UserError(ValueError):
    """A problem with the user's input (checkpoint, flags, prompts) that a message can explain."""


class AgreedError(UserError):
    """A user error that every rank knows about (``Comm.agree``), so each can exit on its own."""


def cli_main(body: Callable[[], None]) -> int:
    """Run a one-process command's body; a ``UserError`` becomes one ``error:`` line on stderr and
    exit code 2."""
    try:
        body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0
