"""Errors the engine raises for bad input; the command line prints them as one line and exits 2."""


class UserError(Exception):
    """A problem with what the user gave us (a file, a key, a path): reported in one line, exit code 2."""


class ConfigError(UserError):
    """A profile or an override is wrong.

    The message is one line: ``<source>: <dotted.key>: expected <what>, found <what>``.
    """

    def __init__(self, source: str, key: str, expected: str, found: object = None, *, hint: str = ""):
        self.source = source
        self.key = key
        self.expected = expected
        self.found = found
        msg = f"{source}: {key}: expected {expected}"
        if found is not None:
            msg += f", found {found!r}" if not isinstance(found, str) or not found.startswith("<") else f", found {found}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class DataError(UserError):
    """A data set is missing or malformed; the message names the path and how to get it."""


class NonFiniteError(Exception):
    """Training diverged: a non-finite loss or weight. The last good checkpoint is kept; the command line
    prints the one-line message and exits with :attr:`exit_code`."""

    exit_code = 3


def file_kind(mode: int) -> str:
    """What a non-regular file is, for a one-line error (``a FIFO (named pipe)``, ``a character device``, ...)."""
    import stat

    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"
