"""TLS contexts for the node's servers and clients, and the caller's identity from its certificate.

Both listeners require a client certificate signed by the configured CA. The identity of a
caller (an SAE ID on the northbound API, a node ID on the peer channel) is the certificate's
subject commonName: never a header or a path parameter.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from qkdnode.errors import ConfigError


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Verifies the server against `ca` with hostname checking on; presents our certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def checked(file: Path, key: str, build, *paths: Path) -> ssl.SSLContext:
    """Build a context, turning a missing or unreadable PEM into a ConfigError naming the key."""
    for p in paths:
        if p is not None and not p.is_file():
            raise ConfigError(file, key, "a readable PEM file", str(p))
    try:
        return build(*paths)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(file, key, "a PEM certificate and matching private key", f"{paths}: {exc}") from None


def peer_identity(transport) -> str | None:
    """The subject commonName of the verified client certificate of a connection."""
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return value
    return None
