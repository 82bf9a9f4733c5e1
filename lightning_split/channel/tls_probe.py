"""Why a TLS connection failed, in words: gRPC reports only ``UNAVAILABLE: Socket closed``.

When the handshake to the server fails, the client repeats it once with Python's ``ssl`` and the
same files, and reads one byte (a gRPC server that accepted the client's certificate sends its
HTTP/2 settings; one that refused it closes). That says which side refused what: the server's
certificate not signed by the client's CA (or made for another name), or the client's certificate
refused by the server (another CA, or revoked). Only for the error message: nothing is sent.
"""

from __future__ import annotations

import socket
import ssl

from .certs import TLSFiles

# What a server's TLS alert says when it refused the client's certificate.
CLIENT_REFUSED = ("unknown ca", "bad certificate", "certificate required", "certificate unknown",
                  "certificate revoked", "access denied", "decrypt error")


def host_port(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, with gRPC's ``dns:``/``ipv4:``/``ipv6:`` prefixes."""
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        address = address.removeprefix(scheme)
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def diagnose(address: str, tls: TLSFiles, server_name: str | None = None, timeout_s: float = 5.0) -> str | None:
    """What refused the handshake, or None if it succeeds here or the server cannot be reached."""
    try:
        host, port = host_port(address)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with ctx.wrap_socket(raw, server_hostname=server_name or host) as conn:
                conn.settimeout(min(timeout_s, 1.0))
                try:  # TLS 1.3: the server judges the client's certificate after the handshake
                    refused = conn.recv(1) == b""  # a gRPC server that took it sends its HTTP/2 settings
                except TimeoutError:
                    refused = False
                if refused:
                    return (f"the server closed the connection on seeing this client's certificate {tls.cert}: it "
                            "must be signed by the CA the server trusts, and not revoked")
    except ssl.SSLCertVerificationError as e:
        if e.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
            return (f"the server's certificate is not made for the name {server_name or host!r} "
                    f"({e.verify_message}); the name the client checks is set by server_name_override")
        return f"the server's certificate is not signed by the CA in {tls.ca} ({e.verify_message})"
    except ssl.SSLError as e:
        text = str(e).lower()
        if any(reason in text for reason in CLIENT_REFUSED):
            return (f"the server refused this client's certificate {tls.cert} ({e.reason or e}): it must be "
                    "signed by the CA the server trusts, and not revoked")
        return f"TLS handshake failed: {e}"
    except (OSError, ValueError):
        return None  # not reachable, or not a TLS problem: gRPC's own message says it
    return None
