"""User-facing errors.

Every problem a user can cause (bad input, bad config, existing outputs) raises a
:class:`NeurotraceError` whose message is one line naming the file or key and the
problem. The CLI prints that line and exits non-zero; tracebacks only with ``--debug``.
"""

from __future__ import annotations

import errno


class NeurotraceError(Exception):
    """A problem with the user's input, configuration or outputs (one-line message)."""

    exit_code = 2


class InputError(NeurotraceError):
    """An input file is missing, unreadable, corrupt or of an unsupported kind."""


class ConfigError(NeurotraceError):
    """A configuration file or flag is invalid (unknown key, wrong type, out of range)."""


class OutputError(NeurotraceError):
    """An output exists already, would overwrite an input, or cannot be written."""


class SWCError(InputError):
    """An SWC file does not parse or does not validate (message names the line)."""


#: Operating-system failures that are the user's to fix (space, quota, permissions), not bugs.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def storage_error(exc: OSError, where: object = None) -> NeurotraceError | None:
    """A one-line error for a full disk, exhausted quota or missing permission, else ``None``.

    It names the file, else ``where`` (the output being written).

    Examples
    --------
    >>> import errno
    >>> print(storage_error(OSError(errno.ENOSPC, "No space left on device"), "out.ome.zarr"))
    out.ome.zarr: No space left on device
    """
    if exc.errno not in STORAGE_ERRNOS:
        return None
    return OutputError(f"{exc.filename or where or 'a file'}: {exc.strerror or exc}")
