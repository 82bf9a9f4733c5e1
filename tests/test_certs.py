"""Certificates: what make_certs and the `lightning-split certs` CLI write."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lightning_split import cli
from lightning_split.channel.certs import (
    NODE_URI_PREFIX,
    client_tls,
    make_certs,
    make_client_cert,
    server_tls,
)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_cli_writes_pki_with_private_keys_0600(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    rc = cli.main(["certs", "--out", str(out), "--server-name", "split.example", "--server-name", "10.1.2.3",
                   "--client", "alice", "--client", "bob", "--days", "30"])
    assert rc == 0
    for name in ("ca.pem", "ca/ca.pem", "ca/ca.key", "server/ca.pem", "server/server.pem", "server/server.key",
                 "clients/alice.pem", "clients/alice.key", "clients/bob.pem", "clients/bob.key"):
        assert (out / name).is_file(), name
    for key in ("ca/ca.key", "server/server.key", "clients/alice.key", "clients/bob.key"):
        assert _mode(out / key) == 0o600, key
    assert not list(out.glob("*.key")) and not list((out / "server").glob("ca.key"))  # the CA key is apart
    server = _load(out / "server" / "server.pem")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "split.example"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"), ipaddress.ip_address("10.1.2.3")}
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert dt.timedelta(days=29) < lifetime < dt.timedelta(days=31)


def test_client_identity_is_cn_and_uri(tmp_path: Path) -> None:
    paths = make_certs(tmp_path, client_ids=["alice"])
    cert = _load(paths.clients["alice"][0])
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [NODE_URI_PREFIX + "alice"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    ca = _load(paths.ca_cert)
    cert.verify_directly_issued_by(ca)
    assert client_tls(tmp_path, "alice").cert == paths.clients["alice"][0]
    assert server_tls(tmp_path).key == paths.server_key


def test_existing_ca_is_reused_for_new_clients(tmp_path: Path) -> None:
    first = make_certs(tmp_path, client_ids=["alice"])
    ca_before = first.ca_cert.read_bytes()
    second = make_certs(tmp_path, client_ids=["carol"])
    assert second.ca_cert.read_bytes() == ca_before
    _load(second.clients["carol"][0]).verify_directly_issued_by(_load(first.ca_cert))


def test_explicit_validity_window(tmp_path: Path) -> None:
    make_certs(tmp_path, client_ids=[])
    past = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    cert_path, key_path = make_client_cert(tmp_path, "old", not_before=past,
                                           not_after=past + dt.timedelta(days=1))
    cert = _load(cert_path)
    assert cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc)
    assert _mode(key_path) == 0o600
    with pytest.raises(ValueError):
        make_client_cert(tmp_path, "bad", not_before=past, not_after=past)


@pytest.mark.parametrize("node_id", ["", "a b", "../evil", "x" * 65, "-lead"])
def test_bad_node_ids_are_refused(tmp_path: Path, node_id: str) -> None:
    with pytest.raises(ValueError):
        make_certs(tmp_path, client_ids=[node_id])


def test_cli_usage_and_module_entry(tmp_path: Path) -> None:
    assert cli.main([]) == 2
    assert cli.main(["no-such-command"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["certs"])  # --out is required
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "lightning_split.cli", "certs", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (out / "clients" / "client.pem").is_file()  # the default client id
