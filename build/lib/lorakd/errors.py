"""The one exception type for bad input: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A problem with the user's files, options or config, explained in one line."""
