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


def checked(file: Path, build, ca: tuple[str, Path], cert: tuple[str, Path], key: tuple[str, Path]) -> ssl.SSLContext:
    """Build a context from (config key, path) pairs; a missing or unusable PEM becomes a
    ConfigError naming the config key that points at it."""
    for name, path in (ca, cert, key):
        if not path.is_file():
            raise ConfigError(file, name, "a readable PEM file", f"no file at {path}")
    try:
        ssl.create_default_context(cafile=str(ca[1]))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(file, ca[0], "a PEM file of CA certificates", f"{ca[1]}: {exc}") from None
    try:
        return build(ca[1], cert[1], key[1])
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(file, cert[0], f"a PEM certificate matching the private key in {key[0]}",
                          f"{cert[1]}: {exc}") from None


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
