"""The warning the ready line carries when a server is reachable beyond this machine without an
API key; fermi/security.py decides it from the configured keys."""

from __future__ import annotations

from fermi import security
from fermi.settings import Settings


def exposure_warning(host: str, settings: Settings) -> str | None:
    """A warning when the server listens beyond loopback without an API key, else None."""
    return security.exposure_warning(host, security.keys_from_settings(settings))
