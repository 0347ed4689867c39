"""Small shared helpers: errors, registries, seeding, atomic file writes."""

from bissl.utils.errors import BisslError, ConfigError, DataError
from bissl.utils.registry import Registry

__all__ = ["BisslError", "ConfigError", "DataError", "Registry"]
