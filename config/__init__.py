"""Settings from the environment and model declarations from models.yaml (torch-free)."""

from config.settings import ConfigError, Settings, get_settings

__all__ = ["ConfigError", "Settings", "get_settings"]
