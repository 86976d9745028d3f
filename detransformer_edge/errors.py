"""Typed errors shared across the product. Each carries a message a user can act on."""


class DetransformerError(Exception):
    """Base class of every error this product raises on purpose."""


class ConfigError(DetransformerError, ValueError):
    """A configuration, preset or argument is invalid."""


class ModelNotInstalledError(DetransformerError):
    """A pretrained model package is missing; the message names the install command."""
