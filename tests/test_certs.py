"""rollout.certs: the local fleet's private CA and node certificates, made in-process.

Real TLS handshakes on loopback with the same contexts the agent and its clients use
(rollout.tls, plus OpenSSL's X509_STRICT checks): the leaf verifies against its CA for
its IP or DNS name, and is refused for another host, by another CA, or once expired.
Also the fields themselves, cryptography's RFC 5280 verifier, and how the files are
written (keys 0600, atomically).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from rollout import certs
from rollout.tls import client_context, server_context

LOOPBACK = "127.0.0.1"
NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)


def files(
    directory: Path, host: str, ca: certs.CertPair | None = None, now: dt.datetime | None = None
) -> tuple[Path, Path, Path]:
    """ca.pem, and tls.pem / tls-key.pem for `host`, as `fleet up` writes them."""
    ca = ca or certs.make_ca()
    directory.mkdir(parents=True, exist_ok=True)
    certs.write(ca, directory / "ca.pem", directory / "ca-key.pem")
    certs.write(certs.issue(ca, host, now=now), directory / "tls.pem", directory / "tls-key.pem")
    return directory / "ca.pem", directory / "tls.pem", directory / "tls-key.pem"


async def handshake(
    ca_file: Path, cert: Path, key: Path, server_hostname: str
) -> dict[str, object]:
    """A TLS connection to a loopback server serving `cert`; return the verified peer cert."""
    server_ctx = server_context(cert, key)
    client_ctx = client_context(ca_file)
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default; be ready

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello over tls\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, LOOPBACK, 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            LOOPBACK, port, ssl=client_ctx, server_hostname=server_hostname
        )
        try:
            assert await reader.readline() == b"hello over tls\n"
            peer: dict[str, object] = writer.get_extra_info("peercert")
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    return peer


# -- real handshakes ---------------------------------------------------------------------------
async def test_leaf_verifies_against_its_ca_in_a_real_handshake(tmp_path: Path) -> None:
    ca_file, cert, key = files(tmp_path, LOOPBACK)
    peer = await handshake(ca_file, cert, key, LOOPBACK)
    assert peer["subjectAltName"] == (("IP Address", LOOPBACK),)
    assert peer["subject"] == ((("commonName", LOOPBACK),),)
    assert peer["issuer"] == ((("commonName", certs.CA_NAME),),)


async def test_dns_name_host_gets_a_dns_subject_alt_name(tmp_path: Path) -> None:
    ca_file, cert, key = files(tmp_path, "node-01.fleet.test")
    peer = await handshake(ca_file, cert, key, "node-01.fleet.test")
    assert peer["subjectAltName"] == (("DNS", "node-01.fleet.test"),)
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await handshake(ca_file, cert, key, "node-02.fleet.test")


async def test_wrong_host_is_refused(tmp_path: Path) -> None:
    ca_file, cert, key = files(tmp_path, LOOPBACK)
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        await handshake(ca_file, cert, key, "127.0.0.9")  # same socket, another name


async def test_another_ca_is_refused(tmp_path: Path) -> None:
    _, cert, key = files(tmp_path / "a", LOOPBACK)
    other_ca, _, _ = files(tmp_path / "b", LOOPBACK)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        await handshake(other_ca, cert, key, LOOPBACK)


async def test_validity_allows_clock_skew_and_expires(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    ca = certs.make_ca()
    # Made by a clock 2 minutes ahead of ours: not-before is 5 minutes back, so still fine.
    ca_file, cert, key = files(tmp_path / "ahead", LOOPBACK, ca, now=now + dt.timedelta(minutes=2))
    await handshake(ca_file, cert, key, LOOPBACK)
    ca_file, cert, key = files(tmp_path / "old", LOOPBACK, ca, now=now - dt.timedelta(days=91))
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate has expired"):
        await handshake(ca_file, cert, key, LOOPBACK)


# -- the certificates' fields --------------------------------------------------------------------
def test_ca_is_a_self_signed_p256_ca_that_only_signs_certificates() -> None:
    ca = certs.make_ca(now=NOW).certificate
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert ca.not_valid_before_utc == NOW - certs.SKEW
    assert ca.not_valid_after_utc == NOW + dt.timedelta(days=certs.CA_DAYS)


def test_leaf_is_a_server_certificate_for_the_ip_signed_by_the_ca() -> None:
    ca = certs.make_ca(now=NOW)
    leaf = certs.issue(ca, "127.0.0.5", now=NOW).certificate
    leaf.verify_directly_issued_by(ca.certificate)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.5")]
    assert san.get_values_for_type(x509.DNSName) == []
    basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert leaf.not_valid_before_utc == NOW - certs.SKEW
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(days=certs.LEAF_DAYS)
    assert leaf.serial_number != ca.certificate.serial_number


def test_cryptography_rfc5280_verifier_accepts_the_chain_for_its_ip_only() -> None:
    verification = pytest.importorskip("cryptography.x509.verification")  # cryptography >= 42
    ca = certs.make_ca(now=NOW)
    leaf = certs.issue(ca, "127.0.0.5", now=NOW).certificate
    policy = (
        verification.PolicyBuilder()
        .store(verification.Store([ca.certificate]))
        .time(NOW + dt.timedelta(days=1))
    )
    good = policy.build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.5")))
    assert good.verify(leaf, []) == [leaf, ca.certificate]
    wrong = policy.build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.6")))
    with pytest.raises(verification.VerificationError):
        wrong.verify(leaf, [])


def test_bad_input_is_a_value_error() -> None:
    ca = certs.make_ca()
    for host in ("", " 127.0.0.5"):
        with pytest.raises(ValueError, match="host"):
            certs.issue(ca, host)
    with pytest.raises(ValueError, match="aware"):
        certs.make_ca(now=dt.datetime(2030, 1, 1))  # naive on purpose


# -- the files -------------------------------------------------------------------------------
def test_write_keys_0600_certificates_0644_atomically(tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.pem", tmp_path / "tls-key.pem"
    key.write_text("an old, world-readable key\n")
    key.chmod(0o644)
    old_umask = os.umask(0)  # the modes must not depend on the umask
    try:
        pair = certs.issue(certs.make_ca(), LOOPBACK)
        certs.write(pair, cert, key)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tls-key.pem", "tls.pem"]
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert loaded.public_key() == pair.key.public_key()
    assert x509.load_pem_x509_certificate(cert.read_bytes()) == pair.certificate


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "tls.pem").mkdir()  # the rename over it fails
    with pytest.raises(IsADirectoryError):
        certs.write(certs.make_ca(), tmp_path / "tls.pem", tmp_path / "tls-key.pem")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tls-key.pem", "tls.pem"]
