"""Errors that name the file and the problem."""


class CladError(Exception):
    """Base class of the errors clad raises on bad input."""


class ImageLoadError(CladError, ValueError):
    """An image or mask file cannot be read or is not usable."""


class DatasetError(CladError, ValueError):
    """A dataset folder is missing, empty or malformed."""


class ConfigError(CladError, ValueError):
    """A configuration or saved-model file is malformed."""


class TeachingError(CladError, ValueError):
    """Normal references cannot be added to this detector: it cannot be taught (``can_add_references`` is False),
    is not fitted, was saved without what teaching needs, or no image was given."""


class ModelNotFoundError(CladError, FileNotFoundError):
    """A model that must be supplied by the user (e.g. CLIP weights) is not there."""


class SpecError(CladError, ValueError):
    """A command-line value (parameters, shots, a dataset or detector spec) is malformed."""


class PluginError(CladError, ImportError):
    """A detector, backbone, text encoder or dataset scheme from another package (an entry point) fails to load."""


class DependencyError(CladError, ImportError):
    """An optional package that a feature needs is not installed; the message names it and the pip command."""


class OutputError(CladError, OSError):
    """An output cannot be written: a file where a folder is needed (or the reverse), another clad run writing
    there, or a run that cannot be resumed."""


class UnknownNameError(CladError, KeyError):
    """A name no registry or table holds; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


class Interrupted(KeyboardInterrupt):
    """A signal (SIGTERM, or SIGINT as Ctrl-C) asked the run to stop; what is finished is kept."""


class DatabaseError(CladError, OSError):
    """The station's history database (``--db URL``) is malformed, unreachable, refuses the login, or does not
    exist; the message names the URL with its password hidden."""
