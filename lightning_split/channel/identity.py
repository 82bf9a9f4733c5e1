"""Who is on the other end of a stream, and whether that certificate is still good.

A client is its certificate: :class:`Peer` carries the node id (the CN) and the certificate's
SHA-256 fingerprint, to which the server binds sessions (a second certificate with the same CN
cannot take over a session), and its serial, which a CRL can revoke.

:class:`RevocationList` follows the CRL file that ``lightning-split certs revoke`` writes into the
server's folder and only believes one signed by a CA the server trusts. :func:`server_credentials`
follows the server's certificate, key and trust bundle on disk, so rotating them needs no restart.

Channel layer: grpc, cryptography and .certs only.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from .certs import TLSFiles
from .session import HandlerError

log = logging.getLogger(__name__)

_MAX_REMEMBERED_PEERS = 4096


@dataclass(frozen=True)
class Peer:
    """The authenticated client of a stream."""

    node_id: str  # the certificate's CN
    fingerprint: str  # SHA-256 of the DER certificate, hex
    serial: int
    issuer: str = ""  # RFC 4514: a serial is only unique per issuer


def peer_from_auth_context(auth_context: Mapping[str, Sequence[bytes]]) -> Peer:
    """The peer of a gRPC ``context.auth_context()`` under mutual TLS.

    gRPC fills ``x509_common_name`` and ``x509_pem_cert`` from the verified client certificate.
    """
    names = auth_context.get("x509_common_name") or []
    pems = auth_context.get("x509_pem_cert") or []
    if len(names) != 1 or not names[0] or len(pems) != 1:
        raise HandlerError(grpc.StatusCode.UNAUTHENTICATED, "no client certificate identity (CN)")
    try:
        cert = x509.load_pem_x509_certificate(pems[0])
    except ValueError as e:
        raise HandlerError(grpc.StatusCode.UNAUTHENTICATED, f"unreadable client certificate: {e}") from None
    return Peer(node_id=names[0].decode("utf-8", "replace"), fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
                serial=cert.serial_number, issuer=cert.issuer.rfc4514_string())


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten or replaced; None when it is missing."""
    try:
        st = os.stat(path) if path is not None else None
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino) if st else None


class RevocationList:
    """The certificates a CA-signed CRL revokes, reloaded when the file changes.

    ``trust`` is the PEM bundle of CAs whose CRLs count (default: ``ca.pem`` beside the CRL). A
    missing file revokes nothing; an unreadable or badly signed one is refused with an error and the
    previous list stays. Checks of the file are at most one per ``check_interval_s``.
    """

    def __init__(self, path: str | os.PathLike | None, trust: str | os.PathLike | None = None,
                 check_interval_s: float = 1.0) -> None:
        self.path = Path(path) if path else None
        self.trust = Path(trust) if trust else (self.path.parent / "ca.pem" if self.path else None)
        self._interval = check_interval_s
        self._lock = threading.Lock()
        self._revoked: frozenset[int] = frozenset()
        self._issuer = ""
        self._stamps: tuple[object, object] | None = None
        self._next_check = 0.0
        # Fingerprint -> peer for the certificates streams came with, so that live sessions (which
        # know only their fingerprint) can be matched against a new list. Bounded: oldest dropped.
        self._seen: OrderedDict[str, Peer] = OrderedDict()
        self.refresh(force=True)

    @property
    def revoked(self) -> frozenset[int]:
        return self._revoked

    def refresh(self, force: bool = False) -> None:
        """Reload if the CRL or the trust bundle changed on disk (checked once per interval)."""
        if self.path is None:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now < self._next_check:
                return
            self._next_check = now + self._interval
            stamps = (_stamp(self.path), _stamp(self.trust))
            if stamps == self._stamps:
                return
            self._stamps = stamps  # a refused file is refused once, not logged every second
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        if not self.path.exists():
            if self._revoked:
                log.warning("CRL %s is gone: no certificate is revoked any more", self.path)
            self._revoked, self._issuer = frozenset(), ""
            return
        try:
            crl = x509.load_pem_x509_crl(self.path.read_bytes())
            cas = x509.load_pem_x509_certificates(self.trust.read_bytes()) if self.trust else []
            signed = any(ca.subject == crl.issuer and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
                         for ca in cas)
        except (OSError, ValueError, TypeError) as e:
            log.error("ignoring CRL %s (%s); keeping the previous list of %d", self.path, e, len(self._revoked))
            return
        if not signed:
            log.error("ignoring CRL %s: not signed by a CA in %s; keeping the previous list of %d",
                      self.path, self.trust, len(self._revoked))
            return
        self._revoked = frozenset(entry.serial_number for entry in crl)
        self._issuer = crl.issuer.rfc4514_string()
        log.info("CRL %s loaded: %d revoked certificate(s)", self.path, len(self._revoked))

    def _revokes(self, peer: Peer) -> bool:
        return peer.serial in self._revoked and (not peer.issuer or peer.issuer == self._issuer)

    def is_revoked(self, peer: Peer) -> bool:
        """Whether the CRL lists this peer's certificate (called once per stream, when it starts)."""
        self.refresh()
        with self._lock:
            self._seen[peer.fingerprint] = peer
            self._seen.move_to_end(peer.fingerprint)
            if len(self._seen) > _MAX_REMEMBERED_PEERS:
                self._seen.popitem(last=False)
            return self._revokes(peer)

    def revokes_fingerprint(self, fingerprint: str) -> bool:
        """Whether a certificate seen by :meth:`is_revoked` is revoked by the current list."""
        with self._lock:
            peer = self._seen.get(fingerprint)
            return peer is not None and self._revokes(peer)


class _CertificateFiles:
    """The server's certificate, key and trust bundle, re-read when one of them changes."""

    def __init__(self, tls: TLSFiles) -> None:
        self.paths = (Path(tls.ca), Path(tls.cert), Path(tls.key))
        self._lock = threading.Lock()
        self._stamps: tuple[object, ...] = ()

    def initial(self) -> grpc.ServerCertificateConfiguration:
        config = self._load(strict=True)
        assert config is not None
        return config

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC calls this before every TLS handshake: a new configuration, or None for no change."""
        try:
            return self._load(strict=False)
        except Exception:  # an exception here would fail the handshake; keep serving instead
            log.exception("reloading the server certificate failed; keeping the current one")
            return None

    def _load(self, strict: bool) -> grpc.ServerCertificateConfiguration | None:
        stamps = tuple(_stamp(p) for p in self.paths)  # three stat calls per new connection
        with self._lock:
            if stamps == self._stamps:
                return None
            self._stamps = stamps
            try:
                ca, cert_pem, key_pem = (p.read_bytes() for p in self.paths)
                _check_pair(ca, cert_pem, key_pem)
            except (OSError, ValueError) as e:
                if strict:
                    raise
                # E.g. caught between the new key and the new certificate: the next handshake retries.
                log.warning("server certificate files are not a usable set (%s); keeping the current one", e)
                return None
        if not strict:
            log.info("server certificate reloaded from %s", self.paths[1])
        return grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=ca)


def _check_pair(ca: bytes, cert_pem: bytes, key_pem: bytes) -> None:
    """Raise ValueError unless the trust bundle parses and the key belongs to the certificate."""
    if not x509.load_pem_x509_certificates(ca):
        raise ValueError("empty trust bundle")
    cert = x509.load_pem_x509_certificates(cert_pem)[0]
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ValueError("the private key does not match the certificate")


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    """Mutual-TLS server credentials that follow ``tls``'s files on disk.

    A rotated server certificate, or a CA added to the trust bundle, applies to new connections
    without a restart; live connections keep what they shook hands with.
    """
    files = _CertificateFiles(tls)
    return grpc.dynamic_ssl_server_credentials(files.initial(), files.fetch, require_client_authentication=True)
