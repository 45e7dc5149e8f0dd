"""celltron's own error classes: a user's mistake (bad input, bad config, a missing or damaged
file), as opposed to a bug. The CLI prints these in one line with their fix; anything else keeps
its traceback so real bugs stay visible.

Every class also derives from ValueError, so code that caught ValueError before keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user gave cannot be used; the message names the file or field and the fix."""


class ConfigError(UserError):
    """A config field or command-line option is missing, misspelt or out of range."""


class InputError(UserError):
    """An input file cannot be used as it is; the message names the file, the field and the fix."""


class DataIntegrityError(UserError):
    """Stored data is damaged (a checksum or structural check failed); the message names the file,
    the block and `celltron corpus validate`."""


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or damaged."""


class OutputExistsError(UserError, FileExistsError):
    """celltron refuses to write over a folder or file it did not write itself."""
