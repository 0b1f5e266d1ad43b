"""Whether a server is reachable beyond this machine without an API key: the one place that
decides the warning the ready line carries."""

from __future__ import annotations

import ipaddress

from fermi.settings import Settings


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and "localhost"; a wildcard ("0.0.0.0", "::", "") is not."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def exposure_warning(host: str, settings: Settings) -> str | None:
    """A warning when the server listens beyond loopback without an API key, else None."""
    if settings.api_key or is_loopback(host):
        return None
    return (
        f"listening on {host or '0.0.0.0'} without an API key: anyone who can reach this port "
        "can use the model (set --api-key or bind 127.0.0.1)"
    )
