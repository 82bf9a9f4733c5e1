"""A small private PKI for the channel (claim 7): a CA, a server certificate, client certificates.

The client's identity *is* its certificate: the subject CN is the node id, repeated as a SAN URI
``urn:lightning-split:node:<id>``. The server reads the CN from the TLS auth context and requires
every frame's header ``node_id`` to match it, so a client cannot speak for another. Sessions are
bound to the certificate's fingerprint too (identity.py), and a CRL revokes single certificates.

Layout of a PKI folder (:class:`Layout`): the CA's private key never sits where the server reads::

    DIR/ca/ca.pem, ca.key                 the CA: only `lightning-split certs` needs the key
    DIR/server/ca.pem                     what the server reads: the CAs it trusts for clients,
    DIR/server/server.pem, server.key     its certificate and key,
    DIR/server/crl.pem                    and the revocation list (written by `certs revoke`)
    DIR/clients/<id>.pem, <id>.key        one pair per client node
    DIR/ca.pem                            the public CA certificate, for clients

A folder in the older flat layout (ca.pem, ca.key, server.pem, server.key at the top) is still read
and written in place.

Keys are ECDSA P-256 by default: handshakes are several times cheaper than with RSA-2048 and every
TLS stack gRPC links supports them. Private keys are written with mode 0600. Files are replaced
atomically, so a running server never reads half of a rotated certificate.
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
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NODE_URI_PREFIX = "urn:lightning-split:node:"
# Node ids become file names, certificate CNs and URNs: keep them boring.
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class TLSFiles:
    """PEM files one side of the channel needs: the CA that signs the peer, its own cert and key.

    ``crl`` (server side only) is the revocation list; a missing file revokes nothing.
    """

    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) as bytes, in the order grpc's credential helpers want them."""
        return Path(self.ca).read_bytes(), Path(self.cert).read_bytes(), Path(self.key).read_bytes()


@dataclass(frozen=True)
class Layout:
    """Where a PKI folder keeps what (see the module docstring)."""

    root: Path
    ca_dir: Path
    server_dir: Path

    @classmethod
    def of(cls, root: str | os.PathLike) -> Layout:
        root = Path(root)
        # The flat layout (or a server bundle folder given directly): everything at the top.
        flat = not (root / "server").is_dir() and ((root / "ca.key").exists() or (root / "server.pem").exists())
        return cls(root, root, root) if flat else cls(root, root / "ca", root / "server")

    ca_cert = property(lambda self: self.ca_dir / "ca.pem")
    ca_key = property(lambda self: self.ca_dir / "ca.key")
    public_ca = property(lambda self: self.root / "ca.pem")
    trust = property(lambda self: self.server_dir / "ca.pem")
    server_cert = property(lambda self: self.server_dir / "server.pem")
    server_key = property(lambda self: self.server_dir / "server.key")
    crl = property(lambda self: self.server_dir / "crl.pem")

    def client(self, node_id: str) -> tuple[Path, Path]:
        validate_node_id(node_id)
        return self.root / "clients" / f"{node_id}.pem", self.root / "clients" / f"{node_id}.key"


@dataclass(frozen=True)
class CertPaths:
    """What :func:`make_certs` wrote."""

    out_dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # node_id -> (cert, key)
    server_dir: Path  # the folder the server reads (ChannelServer(tls=server_tls(out_dir)))


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


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a sibling temp file (created with ``mode``), then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if tmp.exists():
        tmp.unlink()  # os.open's mode only applies when the file is created
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)  # the umask cannot widen it, but be explicit
    os.replace(tmp, path)


def _write_key(path: Path, key: PrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomic(path, data, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM))


def load_ca(out_dir: str | os.PathLike) -> tuple[x509.Certificate, PrivateKey]:
    layout = Layout.of(out_dir)
    cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    return cert, key  # type: ignore[return-value]


def _publish_ca(layout: Layout, cert: x509.Certificate, fresh: bool) -> None:
    """The public CA certificate for clients, and the server's trust bundle.

    The bundle may hold more CAs than ours (added by hand, e.g. while moving to a new CA): keep them,
    unless our CA itself is new.
    """
    pem = cert.public_bytes(serialization.Encoding.PEM)
    if layout.public_ca != layout.ca_cert:
        _write_atomic(layout.public_ca, pem)
    if layout.trust == layout.ca_cert:
        return
    bundle = b"" if fresh or not layout.trust.exists() else layout.trust.read_bytes()
    if pem not in bundle:
        _write_atomic(layout.trust, bundle + (b"" if not bundle or bundle.endswith(b"\n") else b"\n") + pem)


def make_ca(
    out_dir: str | os.PathLike,
    common_name: str = "lightning-split CA",
    days: float = 3650,
    key_kind: str = "ec",
) -> tuple[Path, Path]:
    """Create the CA (``ca/ca.pem`` and ``ca/ca.key`` under ``out_dir``); returns their paths."""
    layout = Layout.of(out_dir)
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
    _write_cert(layout.ca_cert, cert)
    _write_key(layout.ca_key, key)
    _publish_ca(layout, cert, fresh=True)
    return layout.ca_cert, layout.ca_key


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
    # Key first: a server that reloads in between sees a key that does not match the old
    # certificate and keeps its previous pair (identity.server_credentials checks).
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
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


def server_names(out_dir: str | os.PathLike) -> list[str]:
    """The names of the current server certificate: its CN first, then its DNS and IP SANs."""
    cert = x509.load_pem_x509_certificate(Layout.of(out_dir).server_cert.read_bytes())
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [str(cns[0].value)] if cns else []
    names += sans.get_values_for_type(x509.DNSName)
    names += [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    return list(dict.fromkeys(names))


def make_server_cert(
    out_dir: str | os.PathLike,
    names: Iterable[str] = (),
    days: float = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key_kind: str = "ec",
) -> tuple[Path, Path]:
    """``server/server.pem``/``server.key`` signed by the CA in ``out_dir`` (a new key each time).

    SANs: localhost, 127.0.0.1, ::1 and every extra name (IP literals become IP SANs).
    """
    layout = Layout.of(out_dir)
    names = list(names)
    cn = names[0] if names else "localhost"
    return _leaf(
        layout.root, cn, _server_sans(names), ExtendedKeyUsageOID.SERVER_AUTH,
        layout.server_cert, layout.server_key, days, not_before, not_after, key_kind,
    )


def make_client_cert(
    out_dir: str | os.PathLike,
    node_id: str,
    days: float = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key_kind: str = "ec",
) -> tuple[Path, Path]:
    """``clients/<node_id>.pem``/``.key``: CN = node id, SAN URI ``urn:lightning-split:node:<id>``.

    Calling it again renews the certificate: a new key and serial, the same CA and identity.
    """
    layout = Layout.of(out_dir)
    cert_path, key_path = layout.client(node_id)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(NODE_URI_PREFIX + node_id)]
    return _leaf(
        layout.root, node_id, sans, ExtendedKeyUsageOID.CLIENT_AUTH, cert_path, key_path,
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
    layout = Layout.of(out)
    if layout.server_dir == out and (out / "server.pem").exists() and not layout.ca_key.exists():
        raise ValueError(f"{out} looks like a server bundle (no CA key): point at the PKI folder above it")
    if layout.ca_cert.exists() and layout.ca_key.exists():
        _publish_ca(layout, load_ca(out)[0], fresh=False)
    else:
        make_ca(out, days=max(days, 3650), key_kind=key_kind)
    server = make_server_cert(out, server_names, days=days, key_kind=key_kind)
    clients = {cid: make_client_cert(out, cid, days=days, key_kind=key_kind) for cid in client_ids}
    return CertPaths(out, layout.ca_cert, layout.ca_key, server[0], server[1], clients, layout.server_dir)


def revoke(
    out_dir: str | os.PathLike,
    serials: Iterable[int],
    days: float = 365,
) -> Path:
    """Add certificate serials to the CA-signed CRL in the server's folder; returns its path.

    The server reloads the file within a second or so: new streams of a revoked certificate are
    refused and its live sessions closed. Entries already in the CRL are kept.
    """
    layout = Layout.of(out_dir)
    ca_cert, ca_key = load_ca(out_dir)
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=days))
    )
    listed: set[int] = set()
    number = 0
    if layout.crl.exists():
        old = x509.load_pem_x509_crl(layout.crl.read_bytes())
        if not old.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
            raise ValueError(f"{layout.crl} is not signed by this CA: refusing to extend it")
        for entry in old:
            builder = builder.add_revoked_certificate(entry)
            listed.add(entry.serial_number)
        with_number = [e.value for e in old.extensions if isinstance(e.value, x509.CRLNumber)]
        number = with_number[0].crl_number if with_number else 0
    for serial in serials:
        if serial not in listed:
            listed.add(serial)
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    crl = (
        builder.add_extension(x509.CRLNumber(number + 1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    _write_atomic(layout.crl, crl.public_bytes(serialization.Encoding.PEM))
    return layout.crl


def cert_serial(path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> int:
    """The serial of a PEM certificate; with ``out_dir``, checked to be issued by that folder's CA."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    if out_dir is not None:
        try:  # by signature: our CAs all share one name
            cert.verify_directly_issued_by(load_ca(out_dir)[0])
        except (ValueError, TypeError, InvalidSignature):
            raise ValueError(f"{path} was not issued by the CA in {out_dir}") from None
    return cert.serial_number


def server_tls(out_dir: str | os.PathLike) -> TLSFiles:
    """The server's files: ``out_dir`` is a PKI folder (either layout) or its ``server/`` bundle."""
    layout = Layout.of(out_dir)
    return TLSFiles(ca=layout.trust, cert=layout.server_cert, key=layout.server_key, crl=layout.crl)


def client_tls(out_dir: str | os.PathLike, node_id: str) -> TLSFiles:
    """A client's TLS files under ``out_dir`` (``certs`` made them); a clear error naming the node
    id and the command that makes them where one is missing."""
    cert, key = Layout.of(out_dir).client(node_id)
    files = TLSFiles(ca=Path(out_dir) / "ca.pem", cert=cert, key=key)
    missing = [str(p) for p in (files.ca, cert, key) if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(
            f"no TLS files for client node id {node_id!r} ({', '.join(missing)} missing): make them with "
            f"`lightning-split certs --out {out_dir} --client {node_id}`, or use the node id whose "
            "certificate you have (SplitStrategy(node_id=...), Hydra: client.node_id=...)")
    return files
