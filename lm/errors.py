"""The one exception type that means "the user can fix this"."""

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """A bad path, config value or input file; entry points print only its message and exit 1."""


def exit_on_user_error(main: Callable) -> Callable:
    """Wrap an entry point: a UserError ends it with its one-line message and status 1."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            logging.getLogger(Path(sys.argv[0]).stem).error("%s", error)  # "evaluate", ...
            sys.exit(1)

    return wrapped
