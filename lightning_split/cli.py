"""The ``lightning-split`` console script.

Sub-commands live in :data:`COMMANDS` (name -> (help, runner)); a runner takes the remaining argv
and returns an exit code. ``certs`` is argparse; ``serve`` and ``train`` are Hydra apps that parse
their own overrides, which is why the table dispatches on raw argv instead of argparse sub-parsers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Runner = Callable[[list[str]], int]


_CERTS_HELP = """\
Manage the channel's private PKI (mutual TLS).

actions:
  create (default)  a CA (an existing one in --out is reused), the server certificate and one
                    certificate per --client; re-running it reissues those certificates
  rotate            reissue certificates with the existing CA, nothing else: the server's with
                    --server (keeping its names), each --client's; new key and serial each.
                    A running server picks up its new certificate for new connections; a client
                    with a renewed certificate connects and opens a new session.
                    `certs --out DIR --client ID --renew` is the same as `certs rotate`.
  revoke NAME       revoke client NAME's current certificate (clients/NAME.pem), or --serial /
                    --cert: adds it to the CA-signed CRL the server re-reads (server/crl.pem).
                    New streams with it are refused, its live sessions closed.

layout of --out:
  ca/ca.pem, ca/ca.key          the CA: keep the key offline, only this command needs it
  server/                       all the server reads: ca.pem, server.pem, server.key, crl.pem
  clients/<id>.pem, <id>.key    the clients' certificates
  ca.pem                        the CA certificate clients trust
"""


def _certs(argv: list[str]) -> int:
    """``lightning-split certs [create|rotate|revoke NAME] --out DIR ...`` (see ``_CERTS_HELP``)."""
    from lightning_split.channel import certs

    p = argparse.ArgumentParser(prog="lightning-split certs", description=_CERTS_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", choices=("create", "rotate", "revoke"), default="create",
                   help="what to do (default: create)")
    p.add_argument("name", nargs="?", help="revoke: the client node id whose certificate to revoke")
    p.add_argument("--out", required=True, help="the PKI folder (layout below)")
    p.add_argument("--server-name", action="append", default=[], metavar="NAME",
                   help="extra DNS name or IP for the server certificate (repeatable); "
                   "localhost, 127.0.0.1 and ::1 are always included")
    p.add_argument("--client", action="append", default=[], metavar="ID",
                   help="client node id (repeatable; create's default: 'client'); it becomes the certificate CN")
    p.add_argument("--days", type=float, default=365, help="validity of the server and client certificates")
    p.add_argument("--key", choices=("ec", "rsa"), default="ec", help="key type (default ECDSA P-256)")
    p.add_argument("--renew", action="store_true", help="same as the rotate action")
    p.add_argument("--server", action="store_true", help="rotate: reissue the server certificate")
    p.add_argument("--revoke-old", action="store_true",
                   help="rotate: also revoke the clients' previous certificates")
    p.add_argument("--serial", action="append", default=[], metavar="N",
                   help="revoke: a certificate serial (decimal or 0x hex; repeatable)")
    p.add_argument("--cert", action="append", default=[], metavar="FILE",
                   help="revoke: a certificate file (PEM; repeatable)")
    args = p.parse_args(argv)
    action = "rotate" if args.renew else args.action
    if args.name and action != "revoke":
        p.error(f"unexpected argument {args.name!r} (only revoke takes a NAME)")
    try:
        if action == "create":
            paths = certs.make_certs(args.out, server_names=args.server_name,
                                     client_ids=args.client or ["client"], days=args.days, key_kind=args.key)
            print(f"CA:     {paths.ca_cert} (its key stays out of {paths.server_dir}, which the server reads)")
            print(f"server: {paths.server_cert}")
            for node_id, (cert, _key) in paths.clients.items():
                print(f"client {node_id}: {cert}")
        elif action == "rotate":
            _rotate(args)
        else:
            serials = [int(s, 0) for s in args.serial]
            serials += [certs.cert_serial(f, args.out) for f in args.cert]
            if args.name:
                serials.append(certs.cert_serial(certs.client_tls(args.out, args.name).cert, args.out))
            if not serials:
                p.error("revoke needs a NAME, --serial or --cert")
            crl = certs.revoke(args.out, serials)
            print(f"revoked {', '.join(f'{s:#x}' for s in serials)}: {crl}")
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    return 0


def _rotate(args: argparse.Namespace) -> None:
    """New certificates from the existing CA (never a new CA): the server's, the named clients'."""
    from lightning_split.channel import certs

    layout = certs.Layout.of(args.out)
    if not layout.ca_key.exists():
        raise ValueError(f"no CA key in {layout.ca_dir}: rotate needs the existing CA (use create for a new PKI)")
    if not (args.server or args.client):
        raise ValueError("rotate what? give --server and/or --client ID")
    if args.server:
        names = [*certs.server_names(args.out), *args.server_name]
        cert, _key = certs.make_server_cert(args.out, names, days=args.days, key_kind=args.key)
        print(f"server: {cert} (reissued)")
    old = []
    for node_id in args.client:
        cert_path = layout.client(node_id)[0]
        if not cert_path.exists():
            raise ValueError(f"no certificate for client {node_id!r} to rotate (create one: certs --client {node_id})")
        old.append(certs.cert_serial(cert_path))
        cert, _key = certs.make_client_cert(args.out, node_id, days=args.days, key_kind=args.key)
        print(f"client {node_id}: {cert} (reissued)")
    if args.revoke_old and old:
        print(f"revoked the previous certificates: {certs.revoke(args.out, old)}")


def _hydra_app(name: str) -> Runner:
    """A runner that imports the Hydra apps (torch, Lightning, gRPC) only when asked for."""

    def run(argv: list[str]) -> int:
        from lightning_split import apps

        return apps.RUNNERS[name](argv)

    return run


COMMANDS: dict[str, tuple[str, Runner]] = {
    "certs": ("create, rotate or revoke the CA, server and client certificates", _certs),
    "serve": ("serve a model's split to clients (Hydra app: conf/serve.yaml)", _hydra_app("serve")),
    "train": ("train the client's part through the server (Hydra app: conf/train.yaml)", _hydra_app("train")),
}


def register(name: str, help_text: str, runner: Runner) -> None:
    """Add a sub-command (used by the Hydra apps ``serve`` and ``train``)."""
    COMMANDS[name] = (help_text, runner)


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: lightning-split <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (help_text, _) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"lightning-split: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return COMMANDS[name][1](rest)


if __name__ == "__main__":
    sys.exit(main())
