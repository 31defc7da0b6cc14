"""Settings from the environment and model declarations from models.yaml (torch-free)."""

from config.settings import Settings, get_settings
from config.values import ConfigError

__all__ = ["ConfigError", "Settings", "get_settings"]
