"""Certificates for the local fleet's TLS: a private CA and one server certificate per node.

Made in-process with the `cryptography` package (already a dependency, for signing), so
`rollout fleet up --tls` needs no `openssl` command on PATH. Two pure steps and one
write step:

- `make_ca()`: a self-signed CA, `CN=rollout local fleet CA`; basicConstraints CA:TRUE,
  pathlen 0 (it signs leaves only) and keyUsage keyCertSign + cRLSign, both critical,
  plus a subjectKeyIdentifier. Valid 365 days.
- `issue(ca, host)`: a server certificate for `host` signed by that CA. Its
  subjectAltName is an IP address when `host` is one (Python's ssl, hence aiohttp,
  matches an IP only against an IP SAN), else a DNS name; `CN=host` too, for humans.
  basicConstraints CA:FALSE and keyUsage digitalSignature (critical; keyEncipherment
  is an RSA thing), extendedKeyUsage serverAuth, subject and authority key
  identifiers. Valid 90 days.
- `write(pair, cert_path, key_path)`: PEM files; the certificate 0644, the private key
  (unencrypted PKCS#8) 0600. Each is written to a temporary file in the same directory
  with its final mode already set and renamed over the target, so a reader sees the old
  file or the whole new one, and a key is never readable by others, not even for an
  instant or when it replaces a looser file.

Every key is EC P-256 signing with ECDSA-SHA256: what every TLS client we meet accepts
(Python's ssl/OpenSSL, aiohttp, curl, browsers), where ed25519 server certificates are
still refused by some. Serial numbers are random (159 bits). Each validity starts 5
minutes in the past so that a clock slightly behind (a VM just booted) accepts a
certificate made a moment ago. The certificates pass OpenSSL's X509_STRICT checks and
cryptography's RFC 5280 verifier. `now` can be given for reproducible validity dates;
the keys are always fresh.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA_DAYS", "CA_NAME", "LEAF_DAYS", "SKEW", "CertPair", "issue", "make_ca", "write"]

CA_NAME = "rollout local fleet CA"
CA_DAYS = 365
LEAF_DAYS = 90
SKEW = dt.timedelta(minutes=5)  # not-before this far in the past, for clock skew


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ValueError("now: expected an aware datetime")
    return now


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """keyCertSign + cRLSign for the CA, digitalSignature (ECDHE handshakes) for a leaf."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(
    name: str = CA_NAME, *, days: int = CA_DAYS, now: dt.datetime | None = None
) -> CertPair:
    """A fresh self-signed CA that may sign end-entity certificates only."""
    start = _now(now)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - SKEW)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return CertPair(cert, key)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue(
    ca: CertPair, host: str, *, days: int = LEAF_DAYS, now: dt.datetime | None = None
) -> CertPair:
    """A fresh server certificate for `host` (an IP address or a DNS name) signed by `ca`."""
    if not host or host != host.strip():
        raise ValueError(f"host: expected an IP address or a DNS name, got {host!r}")
    start = _now(now)
    key = _new_key()
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - SKEW)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san(host)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return CertPair(cert, key)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` with `mode`: a temporary file beside it, then a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # mkstemp made it 0600; the final mode, exactly
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write(
    pair: CertPair, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]
) -> None:
    """Write `pair` as PEM: the private key first (0600), then the certificate (0644)."""
    _write_atomic(Path(key_path), pair.key_pem(), 0o600)
    _write_atomic(Path(cert_path), pair.cert_pem(), 0o644)
