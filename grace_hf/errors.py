"""The one error type for bad user input."""


class GraceInputError(ValueError):
    """Bad input (a file, an item in it, an argument): the message names the file and the item.

    The command line prints the message and exits with status 2 instead of a traceback.
    """
