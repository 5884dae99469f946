"""
The project's expected errors: one base class, and one way for a command to turn them into a one-line message.

An expected error is a problem with what the user gave: a bad setting, a missing or damaged file, data that does not
fit the model. Its message is one line that names the file, key or field and says how to fix it, and a command
prints exactly that line (`error: ...`) and exits with status 1. Anything else (a shape error inside torch, out of
memory, a bug) is not caught: its traceback is the clue, so it keeps it.

Every module raises its own subclass (ConfigError in config.py, DataError in data.py, ...) or one of the two general
ones here. Each also subclasses the built-in error it stands for (ValueError, FileNotFoundError, ...), so code that
catches those keeps working.
"""

import functools
import sys


class GPTLabError(Exception):
    """Base of every expected error: the message is for the user, its first line says what and how to fix it."""


class InputError(GPTLabError, ValueError):
    """A bad value, file content or argument."""


class MissingFileError(GPTLabError, FileNotFoundError):
    """A file or folder that should exist does not: the message names it and what makes it."""


class ExistsError(GPTLabError, FileExistsError):
    """An output that is already there and must not be overwritten: the message says how to replace it."""


def first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def one_line_errors(main):
    """Decorator for a command's main(): an expected error becomes `error: <first line>` on stderr and exit status
    1; anything unexpected propagates with its traceback."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except GPTLabError as e:
            print(f"error: {first_line(e)}", file=sys.stderr)
            sys.exit(1)
    return wrapped
