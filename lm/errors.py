"""The one exception type that means "the user can fix this"."""


class UserError(Exception):
    """A bad path, config value or input file; entry points print only its message and exit 1."""
