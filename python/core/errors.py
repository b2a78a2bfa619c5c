"""The one error type a user can cause, and the CLI wrapper that turns it into one line."""
import functools
import sys


class UserError(Exception):
    """Bad input from the user (file, label, argument): the message says what and what is valid."""


def cli(main):
    """Run `main`; a UserError becomes `error: <message>` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
