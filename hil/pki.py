"""A throwaway PKI for emulated networks and tests: one CA, certificates issued on demand.

Everything is generated at run time into a work folder; nothing here is ever committed.
Keys are EC P-256, files are written 0600. The CA's key is kept there too (`ca-key.pem`), so a
test or an operator of the demo can issue more certificates later (`ThrowawayPKI.open`), e.g.
to renew a node's certificate and watch the node reload it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Credential:
    cert: Path
    key: Path


def write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class ThrowawayPKI:
    def __init__(self, directory: Path, name: str = "qkdnode throwaway test CA"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._ca_name = subject
        self._ca_cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca = self.dir / "ca.pem"
        self.ca.write_bytes(self._ca_cert.public_bytes(serialization.Encoding.PEM))
        write_private(self.dir / "ca-key.pem", self._ca_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    @classmethod
    def open(cls, directory: Path) -> "ThrowawayPKI":
        """The PKI a previous run made in `directory` (its ca.pem and ca-key.pem)."""
        pki = cls.__new__(cls)
        pki.dir = Path(directory)
        pki.ca = pki.dir / "ca.pem"
        pki._ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
        pki._ca_name = pki._ca_cert.subject
        pki._ca_key = serialization.load_pem_private_key((pki.dir / "ca-key.pem").read_bytes(), password=None)
        return pki

    def issue(self, name: str, cn: str, *, hosts: tuple[str, ...] = (), server: bool = False,
              client: bool = True, days: int = 30, expired: bool = False) -> Credential:
        """Issue a certificate with subject CN `cn` (the identity; none if empty) and SANs for
        `hosts`. `expired`: valid for `days` until yesterday (tests of refused certificates)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc) - (dt.timedelta(days=days + 1) if expired else dt.timedelta())
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + \
                 ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
            .issuer_name(self._ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if hosts:
            sans: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    sans.append(x509.DNSName(h))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        cred = Credential(self.dir / f"{name}.pem", self.dir / f"{name}-key.pem")
        cred.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_private(cred.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        return cred
