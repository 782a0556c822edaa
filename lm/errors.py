"""The one exception type that means "the user can fix this", and how entry points report it."""

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """A bad path, config value or input file; entry points print only its message and exit 1."""


class Unsupported(UserError):
    """This machine cannot run what was asked (bf16 on a CPU without it); a benchmark sweep records
    the job as skipped with this message, rather than as a failure."""


def user_error_in(error: BaseException | None) -> UserError | None:
    """The UserError behind `error`: Hydra's `instantiate` wraps those raised in constructors."""
    while error is not None:
        if isinstance(error, UserError):
            return error
        # Looked up, not imported: a model folder loads without Hydra, and where omegaconf was never
        # imported none of its errors can exist.
        omegaconf_errors = sys.modules.get("omegaconf.errors")
        if omegaconf_errors and isinstance(error, omegaconf_errors.MissingMandatoryValue):
            key = error.full_key
            return UserError(f"{key} has no value (??? in the config); give one: {key}=VALUE.")
        error = error.__cause__ or error.__context__
    return None


def exit_on_user_error(main: Callable) -> Callable:
    """Wrap an entry point: a UserError ends it with its one-line message and status 1."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as error:
            user_error = user_error_in(error)
            if user_error is None:
                raise
            logging.getLogger(Path(sys.argv[0]).stem).error("%s", user_error)  # "train", "evaluate", ...
            sys.exit(1)

    return wrapped
