"""The one exception type for bad user input; the CLI turns it into one line and exit code 2."""


class UserError(ValueError):
    """A problem with the user's input (checkpoint, flags, prompts) that a message can explain."""
