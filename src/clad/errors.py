"""Errors that name the file and the problem."""


class CladError(Exception):
    """Base class of the errors clad raises on bad input."""


class ImageLoadError(CladError, ValueError):
    """An image or mask file cannot be read or is not usable."""


class DatasetError(CladError, ValueError):
    """A dataset folder is missing, empty or malformed."""


class ConfigError(CladError, ValueError):
    """A configuration or saved-model file is malformed."""


class ModelNotFoundError(CladError, FileNotFoundError):
    """A model that must be supplied by the user (e.g. CLIP weights) is not there."""


class SpecError(CladError, ValueError):
    """A command-line value (parameters, shots, a dataset or detector spec) is malformed."""


class PluginError(CladError, ImportError):
    """A detector, backbone, text encoder or dataset scheme from another package (an entry point) fails to load."""
