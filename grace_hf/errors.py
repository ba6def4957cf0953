"""The one error type for bad user input, and the message for a renamed flag."""


class GraceInputError(ValueError):
    """Bad input (a file, an item in it, an argument): the message names the file and the item.

    The command line prints the message and exits with status 2 instead of a traceback.
    """


def renamed_flag(old: str, new: str) -> str:
    """The message for a flag (or recipe key) that was renamed: every command says it the same way."""
    return f"{old} was renamed: use {new}"
