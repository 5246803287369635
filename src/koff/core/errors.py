"""koff's user-facing errors: one base class, one subclass per place a mistake can come from.

Every mistake a user can make (a bad flag, config field, data file, run directory, base model or
request) raises a `KoffError` naming the file / field / flag at fault and what was expected. The
command line prints it as one line on stderr and exits with status 2; anything else escaping is a
bug. The subclasses also derive from ValueError, so callers that caught ValueError keep working.
"""

from __future__ import annotations


class KoffError(Exception):
    """A user mistake (not a bug in koff): the CLI prints it as one line and exits 2."""


class ConfigError(KoffError, ValueError):
    """A configuration value or command-line flag is missing or invalid."""


class DataError(KoffError, ValueError):
    """A data file or domain specification is unusable."""


class ArtifactError(KoffError, ValueError):
    """A run directory, memory or export is missing, malformed, or does not fit the base model."""


class ModelError(KoffError, ValueError):
    """The base model cannot be found, loaded or used by koff."""


class ServeError(KoffError, ValueError):
    """A serving request or server setting is invalid."""


__all__ = ["KoffError", "ConfigError", "DataError", "ArtifactError", "ModelError", "ServeError"]
