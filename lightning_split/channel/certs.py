"""A small private PKI for the channel (claim 7): a CA, a server certificate, client certificates.

The client's identity *is* its certificate: the subject CN is the node id, repeated as a SAN URI
``urn:lightning-split:node:<id>``. The server reads the CN from the TLS auth context and requires
every frame's header ``node_id`` to match it, so a client cannot speak for another.

Keys are ECDSA P-256 by default: handshakes are several times cheaper than with RSA-2048 and every
TLS stack gRPC links supports them. Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NODE_URI_PREFIX = "urn:lightning-split:node:"
# Node ids become file names, certificate CNs and URNs: keep them boring.
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class TLSFiles:
    """PEM files one side of the channel needs: the CA that signs the peer, its own cert and key."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) as bytes, in the order grpc's credential helpers want them."""
        return Path(self.ca).read_bytes(), Path(self.cert).read_bytes(), Path(self.key).read_bytes()


@dataclass(frozen=True)
class CertPaths:
    """What :func:`make_certs` wrote."""

    out_dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # node_id -> (cert, key)


def validate_node_id(node_id: str) -> str:
    if not isinstance(node_id, str) or not _NODE_ID_RE.match(node_id):
        raise ValueError(
            f"invalid node id {node_id!r}: 1-64 characters of letters, digits, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return node_id


def _new_key(kind: str = "ec") -> PrivateKey:
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key kind {kind!r} (expected 'ec' or 'rsa')")


def _validity(
    days: float, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    # Back-date a little so a peer whose clock runs slightly behind still accepts a fresh cert.
    start = not_before or now - dt.timedelta(minutes=5)
    end = not_after or start + dt.timedelta(days=days)
    if end <= start:
        raise ValueError("certificate not_after must be later than not_before")
    return start, end


def _write_key(path: Path, key: PrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()  # os.open's mode only applies when the file is created
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # the umask cannot widen it, but be explicit


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def load_ca(out_dir: str | os.PathLike) -> tuple[x509.Certificate, PrivateKey]:
    out = Path(out_dir)
    cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    return cert, key  # type: ignore[return-value]


def make_ca(
    out_dir: str | os.PathLike,
    common_name: str = "lightning-split CA",
    days: float = 3650,
    key_kind: str = "ec",
) -> tuple[Path, Path]:
    """Create ``ca.pem`` and ``ca.key`` in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    key = _new_key(key_kind)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start, end = _validity(days, None, None)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_cert(out / "ca.pem", cert)
    _write_key(out / "ca.key", key)
    return out / "ca.pem", out / "ca.key"


def _leaf(
    out_dir: Path,
    cn: str,
    sans: list[x509.GeneralName],
    eku: x509.ObjectIdentifier,
    cert_path: Path,
    key_path: Path,
    days: float,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
    key_kind: str,
) -> tuple[Path, Path]:
    ca_cert, ca_key = load_ca(out_dir)
    key = _new_key(key_kind)
    start, end = _validity(days, not_before, not_after)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_encipherment=key_kind == "rsa", content_commitment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_cert(cert_path, cert)
    _write_key(key_path, key)
    return cert_path, key_path


def _server_sans(names: Iterable[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in ("localhost", "127.0.0.1", "::1", *names):
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    return sans


def make_server_cert(
    out_dir: str | os.PathLike,
    names: Iterable[str] = (),
    days: float = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key_kind: str = "ec",
) -> tuple[Path, Path]:
    """``server.pem``/``server.key`` signed by the CA in ``out_dir``.

    SANs: localhost, 127.0.0.1, ::1 and every extra name (IP literals become IP SANs).
    """
    out = Path(out_dir)
    names = list(names)
    cn = names[0] if names else "localhost"
    return _leaf(
        out, cn, _server_sans(names), ExtendedKeyUsageOID.SERVER_AUTH,
        out / "server.pem", out / "server.key", days, not_before, not_after, key_kind,
    )


def make_client_cert(
    out_dir: str | os.PathLike,
    node_id: str,
    days: float = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key_kind: str = "ec",
) -> tuple[Path, Path]:
    """``clients/<node_id>.pem``/``.key``: CN = node id, SAN URI ``urn:lightning-split:node:<id>``."""
    out = Path(out_dir)
    validate_node_id(node_id)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(NODE_URI_PREFIX + node_id)]
    return _leaf(
        out, node_id, sans, ExtendedKeyUsageOID.CLIENT_AUTH,
        out / "clients" / f"{node_id}.pem", out / "clients" / f"{node_id}.key",
        days, not_before, not_after, key_kind,
    )


def make_certs(
    out_dir: str | os.PathLike,
    server_names: Iterable[str] = (),
    client_ids: Iterable[str] = ("client",),
    days: float = 365,
    key_kind: str = "ec",
) -> CertPaths:
    """A fresh CA, a server certificate and one client certificate per node id, under ``out_dir``.

    An existing CA in ``out_dir`` is reused, so clients can be added later to the same PKI.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    client_ids = [validate_node_id(c) for c in client_ids]
    if not ((out / "ca.pem").exists() and (out / "ca.key").exists()):
        make_ca(out, days=max(days, 3650), key_kind=key_kind)
    server = make_server_cert(out, server_names, days=days, key_kind=key_kind)
    clients = {cid: make_client_cert(out, cid, days=days, key_kind=key_kind) for cid in client_ids}
    return CertPaths(out, out / "ca.pem", out / "ca.key", server[0], server[1], clients)


def server_tls(out_dir: str | os.PathLike) -> TLSFiles:
    out = Path(out_dir)
    return TLSFiles(ca=out / "ca.pem", cert=out / "server.pem", key=out / "server.key")


def client_tls(out_dir: str | os.PathLike, node_id: str) -> TLSFiles:
    out = Path(out_dir)
    validate_node_id(node_id)
    return TLSFiles(
        ca=out / "ca.pem", cert=out / "clients" / f"{node_id}.pem", key=out / "clients" / f"{node_id}.key"
    )
