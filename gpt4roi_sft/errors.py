"""Errors meant for users: each message names the file, line, record or field at fault.

Command-line entry points catch :class:`UserError` and print its message on one line (exit code 2)
instead of a traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Base class of the errors caused by input the user can fix."""


class DataError(UserError, ValueError):
    """A data file or record is malformed (bad JSON, missing field, region/`<bbox>` mismatch)."""


class BoxError(DataError):
    """A region box is degenerate, not finite, or outside its image."""


class ConfigError(UserError, ValueError):
    """A configuration key is unknown, has the wrong type, or names a combination that cannot work."""


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)``; print a :class:`UserError` as one line on stderr and return exit code 2."""
    import sys

    try:
        rc = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)
