"""API keys and tenants, session id rules and the startup exposure warning: the security
decisions that every transport shares.

Keys come from `FERMI_API_KEY` (one key, or several separated by commas) and from a keys file
(`FERMI_API_KEYS_FILE`: one key per line, optionally followed by whitespace and a tenant name;
blank lines and lines starting with `#` are skipped). Each key is a tenant: its sessions live in
a namespace of their own. Keys given the same name share one tenant (key rotation). With no key
configured every caller is the one anonymous tenant."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from fermi.errors import InvalidRequest

ANONYMOUS = ""  # the tenant of every caller when no key is configured
MAX_SESSION_ID = 128  # characters, on every transport
SHORT_ID = 8  # characters of a session id that logs show


def short_id(session_id: str) -> str:
    """A session id as logs show it: its first 8 characters, then an ellipsis."""
    return session_id if len(session_id) <= SHORT_ID else session_id[:SHORT_ID] + "…"


def validate_session_id(session_id: str | None, param: str = "session_id") -> None:
    """A client-chosen session id: 1 to 128 printable ASCII characters (0x21-0x7e).
    Raises InvalidRequest (the id itself is not echoed: it may be hostile)."""
    if session_id is None:
        return
    if not session_id or len(session_id) > MAX_SESSION_ID:
        raise InvalidRequest(
            f"{param} must have 1 to {MAX_SESSION_ID} characters, got {len(session_id)}",
            param=param,
        )
    if not all("!" <= c <= "~" for c in session_id):
        raise InvalidRequest(
            f"{param} may contain only printable ASCII characters without spaces", param=param
        )


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class KeyRing:
    """The configured keys: sha256(key) -> tenant name. Keys themselves are not kept."""

    tenants: tuple[tuple[bytes, str], ...] = ()

    @property
    def required(self) -> bool:
        return bool(self.tenants)

    def tenant_for_token(self, token: str | None) -> str | None:
        """The tenant of a bearer token; None when keys are required and it matches none.
        Every configured key is compared, in constant time, whatever matches."""
        if not self.required:
            return ANONYMOUS
        presented = _digest(token or "")
        found = None
        for digest, tenant in self.tenants:
            if hmac.compare_digest(digest, presented):
                found = tenant
        return found if token else None

    def tenant_for_header(self, authorization: str | None) -> str | None:
        """The tenant of an `Authorization: Bearer KEY` header value (HTTP or gRPC metadata)."""
        scheme, _, token = (authorization or "").partition(" ")
        if self.required and scheme.lower() != "bearer":
            return None
        return self.tenant_for_token(token.strip())


def parse_keys(api_key: str | None, keys_file: str | None) -> KeyRing:
    """Build the key ring from the settings. Raises InvalidRequest for an unreadable keys file
    or an empty one (which would silently leave the server open)."""
    entries: list[tuple[str, str | None]] = [
        (k.strip(), None) for k in (api_key or "").split(",") if k.strip()
    ]
    if keys_file:
        entries += _read_keys_file(Path(keys_file))
    tenants = {}
    for key, name in entries:
        digest = _digest(key)
        tenants[digest] = name or "key-" + digest.hex()[:12]
    return KeyRing(tuple(tenants.items()))


def _read_keys_file(path: Path) -> list[tuple[str, str | None]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        message = f"cannot read the API keys file {path}: {e}"
        raise InvalidRequest(message, param="api_keys_file") from None
    entries = []
    for line in text.splitlines():
        fields = line.split(None, 1)
        if not fields or fields[0].startswith("#"):
            continue
        entries.append((fields[0], fields[1].strip() if len(fields) > 1 else None))
    if not entries:
        raise InvalidRequest(f"the API keys file {path} holds no key", param="api_keys_file")
    return entries


def keys_from_settings(settings) -> KeyRing:
    return parse_keys(settings.api_key, getattr(settings, "api_keys_file", None))


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable only from this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it may resolve to a public address


def exposure_warning(host: str, keys: KeyRing) -> str | None:
    """The startup warning for a server that listens beyond loopback without an API key;
    None when there is nothing to warn about."""
    if keys.required or is_loopback(host):
        return None
    shown = host or "all interfaces"
    return (
        f"warning: listening on {shown} without an API key: anyone who can reach this port "
        "can use the model and its sessions; set FERMI_API_KEY (or FERMI_API_KEYS_FILE), "
        "or bind 127.0.0.1"
    )
