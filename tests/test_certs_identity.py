"""Certificate identity: revocation (CRL), sessions bound to the certificate, rotation, the PKI layout.

Real gRPC servers on loopback with certificates from our own ``lightning-split certs``; each test
gets its own PKI, since revoking and rotating change it.
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from lightning_split import cli
from lightning_split._proto import split_pb2 as pb
from lightning_split.channel import ChannelClient, ChannelConfig, ChannelServer, HandlerError, RemoteError, TLSFiles
from lightning_split.channel.certs import client_tls, make_certs, revoke, server_tls
from lightning_split.channel.identity import Peer, RevocationList, peer_from_auth_context
from lightning_split.wire import Message
from tests.channel_util import EchoHandler, RawStream, secure_channel, wait_for

FORWARD = pb.FORWARD


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    out = tmp_path / "pki"
    assert cli.main(["certs", "--out", str(out), "--client", "alice", "--client", "bob"]) == 0
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _peer(cert_path: Path) -> Peer:
    cn = _cert(cert_path).subject.rfc4514_string().removeprefix("CN=").encode()
    return peer_from_auth_context({"x509_common_name": [cn], "x509_pem_cert": [cert_path.read_bytes()]})


def _client(port: int, node_id: str, tls: TLSFiles) -> ChannelClient:
    client = ChannelClient(f"127.0.0.1:{port}", node_id, tls=tls)
    client.connect()
    return client


def _refused(attempt, code: grpc.StatusCode) -> str:
    with pytest.raises(RemoteError) as e:
        attempt()
    assert e.value.code == code, e.value
    return e.value.message


def _served_certificate(port: int, tls: TLSFiles) -> x509.Certificate:
    """The certificate the server shows a new connection (Python's ssl, our client certificate)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname="localhost") as conn:
            der = conn.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der)


# -- revocation ------------------------------------------------------------------------------

def test_revoke_refuses_new_streams_and_closes_live_sessions(start_server, pki: Path, caplog) -> None:
    handler = EchoHandler()
    server = start_server(handler, tls=server_tls(pki))
    alice = _client(server.port, "alice", client_tls(pki, "alice"))
    bob = _client(server.port, "bob", client_tls(pki, "bob"))
    assert bob.request(FORWARD, 1).body == 1
    bob_sid = bob.session_id
    try:
        caplog.set_level(logging.WARNING, logger="lightning_split.channel")
        assert cli.main(["certs", "revoke", "bob", "--out", str(pki)]) == 0
        # The reaper (every <= 1 s) re-reads the CRL (at most once a second) and closes bob's session.
        assert wait_for(lambda: bob_sid in handler.closed, timeout=5)
        assert bob_sid not in server.sessions
        assert wait_for(lambda: bob._stream.dead.is_set(), timeout=5)  # its live stream is ended too
        assert any("revoked" in r.getMessage() and bob_sid[:8] in r.getMessage() for r in caplog.records)
        message = _refused(lambda: _client(server.port, "bob", client_tls(pki, "bob")),
                           grpc.StatusCode.PERMISSION_DENIED)
        assert "certificate of node bob is revoked" in message
        assert any(r.levelno == logging.WARNING and "bob" in r.getMessage() and "revoked" in r.getMessage()
                   for r in caplog.records)
        with pytest.raises(RemoteError):  # the live client: its session is gone, a new stream refused
            bob.request(FORWARD, 2)
        assert alice.request(FORWARD, "still served").body == "still served"
        with _client(server.port, "alice", client_tls(pki, "alice")) as again:
            assert again.request(FORWARD, 3).body == 3
    finally:
        alice.close()
        bob.close()


def test_revoke_cli_writes_a_crl_signed_by_the_ca(pki: Path) -> None:
    alice_serial = _cert(pki / "clients/alice.pem").serial_number
    bob_serial = _cert(pki / "clients/bob.pem").serial_number
    assert cli.main(["certs", "revoke", "--out", str(pki), "--cert", str(pki / "clients/alice.pem")]) == 0
    assert cli.main(["certs", "revoke", "--out", str(pki), "--serial", hex(bob_serial), "--serial", "12345"]) == 0
    crl = x509.load_pem_x509_crl((pki / "server" / "crl.pem").read_bytes())
    assert crl.is_signature_valid(_cert(pki / "ca" / "ca.pem").public_key())
    assert {e.serial_number for e in crl} == {alice_serial, bob_serial, 12345}
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    with pytest.raises(SystemExit):
        cli.main(["certs", "revoke", "--out", str(pki)])  # revoke what?
    with pytest.raises(SystemExit):
        cli.main(["certs", "revoke", "nobody", "--out", str(pki)])
    other = make_certs(pki.parent / "other", client_ids=["alice"])
    with pytest.raises(SystemExit):  # not one of our CA's certificates
        cli.main(["certs", "revoke", "--out", str(pki), "--cert", str(other.clients["alice"][0])])


def test_revocation_list_only_believes_our_ca(pki: Path, caplog) -> None:
    crl_path = server_tls(pki).crl
    assert crl_path is not None and not crl_path.exists()
    revocations = RevocationList(crl_path, check_interval_s=0)
    alice, bob = _peer(pki / "clients/alice.pem"), _peer(pki / "clients/bob.pem")
    assert not revocations.is_revoked(alice) and not revocations.is_revoked(bob)  # no CRL: nothing revoked

    revoke(pki, [alice.serial])
    assert revocations.is_revoked(alice) and not revocations.is_revoked(bob)
    assert revocations.revokes_fingerprint(alice.fingerprint) and not revocations.revokes_fingerprint("00")

    caplog.set_level(logging.ERROR, logger="lightning_split.channel.identity")
    other = pki.parent / "other"
    make_certs(other, client_ids=[])
    shutil.copy(revoke(other, [bob.serial]), crl_path)  # a CRL from another CA, listing bob only
    assert revocations.is_revoked(alice) and not revocations.is_revoked(bob)  # the previous list stays
    assert any(r.levelno == logging.ERROR and "not signed by a CA" in r.getMessage() for r in caplog.records)

    crl_path.write_text("-----BEGIN X509 CRL-----\nnot a crl\n-----END X509 CRL-----\n")
    assert revocations.is_revoked(alice) and not revocations.is_revoked(bob)
    crl_path.unlink()
    assert not revocations.is_revoked(alice)


def test_crl_from_another_ca_is_ignored_by_a_running_server(start_server, pki: Path, caplog) -> None:
    server = start_server(EchoHandler(), tls=server_tls(pki))
    caplog.set_level(logging.ERROR, logger="lightning_split.channel.identity")
    other = pki.parent / "other"
    make_certs(other, client_ids=[])
    shutil.copy(revoke(other, [_cert(pki / "clients/bob.pem").serial_number]), pki / "server" / "crl.pem")
    assert wait_for(lambda: any("not signed by a CA" in r.getMessage() for r in caplog.records), timeout=5)
    with _client(server.port, "bob", client_tls(pki, "bob")) as bob:
        assert bob.request(FORWARD, "served").body == "served"


def test_peer_needs_a_certificate() -> None:
    with pytest.raises(HandlerError) as e:
        peer_from_auth_context({"x509_common_name": [b"alice"]})
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


# -- sessions are bound to the certificate ---------------------------------------------------

def test_a_second_certificate_with_the_same_cn_cannot_take_over_a_session(start_server, pki: Path) -> None:
    server = start_server(EchoHandler(), tls=server_tls(pki))
    first = pki.parent / "first"
    first.mkdir()
    for suffix in ("pem", "key"):
        shutil.copy(pki / "clients" / f"alice.{suffix}", first / f"alice.{suffix}")
    first_tls = TLSFiles(ca=pki / "ca.pem", cert=first / "alice.pem", key=first / "alice.key")
    # A renewed certificate: the same CN and CA, a new key and serial.
    assert cli.main(["certs", "--out", str(pki), "--client", "alice", "--renew"]) == 0
    second_tls = client_tls(pki, "alice")
    assert _cert(second_tls.cert).serial_number != _cert(first_tls.cert).serial_number

    with _client(server.port, "alice", first_tls) as owner:
        sid = owner.session_id
        assert owner.request(FORWARD, 1).body == 1
        # Resuming by HANDSHAKE...
        thief = ChannelClient(f"127.0.0.1:{server.port}", "alice", tls=second_tls)
        thief.session_id = sid
        message = _refused(thief.connect, grpc.StatusCode.PERMISSION_DENIED)
        assert "another certificate" in message
        thief.close()
        # ... or by naming the session in a request on a new stream.
        raw = RawStream(secure_channel(server.port, second_tls))
        raw.send_message(Message(type=FORWARD, body=1, session_id=sid, node_id="alice", sequence=1))
        code, _details = raw.finish()
        raw.close()
        assert code == grpc.StatusCode.PERMISSION_DENIED
        # The renewed certificate opens a session of its own; the first one's is untouched.
        with _client(server.port, "alice", second_tls) as renewed:
            assert renewed.session_id != sid
            assert renewed.request(FORWARD, {"count": True}).body == {"count": 1, "node": "alice"}
        assert owner.request(FORWARD, {"count": True}).body == {"count": 2, "node": "alice"}
        # The owner itself still resumes its session on a new stream.
        owner.connect()
        assert owner.session_id == sid
        # Nor can the other certificate join a bonded stream of the first, token in hand.
        bonded = RawStream(secure_channel(server.port, first_tls))
        token = bonded.handshake("alice", ChannelConfig(connections=2))["bond_token"]
        joiner = RawStream(secure_channel(server.port, second_tls))
        joiner.send_message(Message(type=pb.HANDSHAKE, body={"join": token, "index": 1}, node_id="alice", sequence=1))
        code, details = joiner.finish()
        assert code == grpc.StatusCode.PERMISSION_DENIED and "bad join" in details
        joiner.close()
        bonded.close()


# -- rotation ---------------------------------------------------------------------------------

def test_server_certificate_rotation_needs_no_restart(start_server, pki: Path) -> None:
    server = start_server(EchoHandler(), tls=server_tls(pki))
    alice_tls = client_tls(pki, "alice")
    before = _cert(pki / "server" / "server.pem")
    assert _served_certificate(server.port, alice_tls).serial_number == before.serial_number
    with _client(server.port, "alice", alice_tls) as live:
        assert live.request(FORWARD, 1).body == 1
        assert cli.main(["certs", "rotate", "--out", str(pki), "--server"]) == 0
        after = _cert(pki / "server" / "server.pem")
        assert after.serial_number != before.serial_number
        assert after.public_key() != before.public_key()
        san = x509.SubjectAlternativeName
        assert after.extensions.get_extension_for_class(san) == before.extensions.get_extension_for_class(san)
        assert _served_certificate(server.port, alice_tls).serial_number == after.serial_number
        assert live.request(FORWARD, 2).body == 2  # the stream opened before the rotation goes on
        with _client(server.port, "alice", alice_tls) as fresh:
            assert fresh.request(FORWARD, 3).body == 3


def test_a_ca_added_to_the_trust_bundle_applies_without_restart(start_server, pki: Path) -> None:
    server = start_server(EchoHandler(), tls=server_tls(pki))
    other = make_certs(pki.parent / "other", client_ids=["dave"])
    dave_tls = TLSFiles(ca=pki / "ca.pem", cert=other.clients["dave"][0], key=other.clients["dave"][1])
    _refused(lambda: _client(server.port, "dave", dave_tls), grpc.StatusCode.UNAVAILABLE)
    bundle = pki / "server" / "ca.pem"
    bundle.write_bytes(bundle.read_bytes() + other.ca_cert.read_bytes())
    with _client(server.port, "dave", dave_tls) as dave:
        assert dave.request(FORWARD, "welcome").body == "welcome"


def test_rotate_needs_the_existing_ca_and_something_to_rotate(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        cli.main(["certs", "rotate", "--out", str(pki)])
    with pytest.raises(SystemExit):
        cli.main(["certs", "rotate", "--out", str(tmp_path / "empty"), "--client", "alice"])
    with pytest.raises(SystemExit):
        cli.main(["certs", "rotate", "--out", str(pki), "--client", "nobody"])
    old = _cert(pki / "clients/bob.pem").serial_number
    ca = (pki / "ca" / "ca.pem").read_bytes()
    assert cli.main(["certs", "rotate", "--out", str(pki), "--client", "bob", "--revoke-old"]) == 0
    assert (pki / "ca" / "ca.pem").read_bytes() == ca
    assert _cert(pki / "clients/bob.pem").serial_number != old
    assert {e.serial_number for e in x509.load_pem_x509_crl((pki / "server/crl.pem").read_bytes())} == {old}


# -- layout -----------------------------------------------------------------------------------

def test_the_server_bundle_holds_no_ca_key(pki: Path) -> None:
    tls = server_tls(pki)
    bundle = pki / "server"
    assert tls.cert.parent == bundle and tls.key.parent == bundle and tls.ca.parent == bundle
    assert tls.crl == bundle / "crl.pem"
    assert sorted(p.name for p in bundle.iterdir()) == ["ca.pem", "server.key", "server.pem"]
    assert (pki / "ca" / "ca.key").is_file() and not (pki / "ca.key").exists()
    assert (pki / "ca.pem").read_bytes() == (pki / "ca" / "ca.pem").read_bytes()  # what clients trust
    assert server_tls(bundle) == tls  # pointed at the bundle folder itself
    with pytest.raises(ValueError, match="server bundle"):
        make_certs(bundle, client_ids=["x"])


def test_old_layout_folders_still_work(pki: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    (old / "clients").mkdir(parents=True)
    for src, dst in (("ca/ca.pem", "ca.pem"), ("ca/ca.key", "ca.key"), ("server/server.pem", "server.pem"),
                     ("server/server.key", "server.key"), ("clients/alice.pem", "clients/alice.pem"),
                     ("clients/alice.key", "clients/alice.key")):
        shutil.copy(pki / src, old / dst)
    assert server_tls(old) == TLSFiles(ca=old / "ca.pem", cert=old / "server.pem", key=old / "server.key",
                                       crl=old / "crl.pem")
    paths = make_certs(old, client_ids=["carol"])  # the CA is reused and files stay where they were
    assert paths.ca_cert == old / "ca.pem" and paths.server_cert == old / "server.pem"
    assert not (old / "server").exists() and not (old / "ca").exists()
    assert (old / "ca.pem").read_bytes() == (pki / "ca.pem").read_bytes()
    handler = EchoHandler()
    with ChannelServer(handler, tls=server_tls(old)) as server:
        with _client(server.port, "carol", client_tls(old, "carol")) as carol:
            assert carol.request(FORWARD, 1).body == 1
        assert cli.main(["certs", "revoke", "alice", "--out", str(old)]) == 0
        assert (old / "crl.pem").is_file()
        time.sleep(1.1)  # the CRL is looked at once a second at most
        _refused(lambda: _client(server.port, "alice", client_tls(old, "alice")), grpc.StatusCode.PERMISSION_DENIED)



def test_a_missing_client_certificate_is_named_with_the_command_that_makes_it(pki: Path) -> None:
    """A node id without a certificate: the error names the id, the files and the ``certs`` command
    (it was a FileNotFoundError deep in gRPC's TLS setup that never said which node id)."""
    made_by = r"client node id 'nobody'.*lightning-split certs --out .* --client nobody"
    with pytest.raises(FileNotFoundError, match=made_by):
        client_tls(pki, "nobody")


def test_tls_mismatches_say_which_side_refused_what(start_server, pki: Path, tmp_path: Path) -> None:
    """gRPC says only ``UNAVAILABLE``; the client's error names the CA or certificate at fault."""
    server = start_server(EchoHandler())
    other = tmp_path / "other"
    assert cli.main(["certs", "--out", str(other), "--client", "alice"]) == 0
    trusts_another_ca = TLSFiles(ca=other / "ca.pem", cert=pki / "clients" / "alice.pem",
                                 key=pki / "clients" / "alice.key")
    message = _refused(lambda: _client(server.port, "alice", trusts_another_ca), grpc.StatusCode.UNAVAILABLE)
    assert f"the server's certificate is not signed by the CA in {other / 'ca.pem'}" in message
    signed_by_another_ca = TLSFiles(ca=pki / "ca.pem", cert=other / "clients" / "alice.pem",
                                    key=other / "clients" / "alice.key")
    message = _refused(lambda: _client(server.port, "alice", signed_by_another_ca), grpc.StatusCode.UNAVAILABLE)
    assert "the server closed the connection on seeing this client's certificate" in message
    assert str(other / "clients" / "alice.pem") in message
