"""The one exception type for bad user input; the CLI turns it into one line and exit code 2."""

import sys
from collections.abc import Callable


class UserError(ValueError):
    """A problem with the user's input (checkpoint, flags, prompts) that a message can explain."""


def cli_main(body: Callable[[], None]) -> int:
    """Run a command's body; a ``UserError`` becomes one ``error:`` line on stderr and exit code 2."""
    try:
        body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
