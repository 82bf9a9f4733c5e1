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


def _certs(argv: list[str]) -> int:
    from lightning_split.channel.certs import make_certs

    p = argparse.ArgumentParser(
        prog="lightning-split certs",
        description="Create a CA, a server certificate and client certificates (mutual TLS). "
        "An existing CA in --out is reused, so clients can be added later.",
    )
    p.add_argument("--out", required=True, help="output directory (ca.pem, server.pem, clients/<id>.pem)")
    p.add_argument("--server-name", action="append", default=[], metavar="NAME",
                   help="extra DNS name or IP for the server certificate (repeatable); "
                   "localhost, 127.0.0.1 and ::1 are always included")
    p.add_argument("--client", action="append", default=[], metavar="ID",
                   help="client node id (repeatable; default: 'client'); it becomes the certificate CN")
    p.add_argument("--days", type=float, default=365, help="validity of the server and client certificates")
    p.add_argument("--key", choices=("ec", "rsa"), default="ec", help="key type (default ECDSA P-256)")
    args = p.parse_args(argv)
    try:
        paths = make_certs(args.out, server_names=args.server_name, client_ids=args.client or ["client"],
                           days=args.days, key_kind=args.key)
    except ValueError as e:
        p.error(str(e))
    print(f"CA:     {paths.ca_cert}")
    print(f"server: {paths.server_cert}")
    for node_id, (cert, _key) in paths.clients.items():
        print(f"client {node_id}: {cert}")
    return 0


def _hydra_app(name: str) -> Runner:
    """A runner that imports the Hydra apps (torch, Lightning, gRPC) only when asked for."""

    def run(argv: list[str]) -> int:
        from lightning_split import apps

        return apps.RUNNERS[name](argv)

    return run


COMMANDS: dict[str, tuple[str, Runner]] = {
    "certs": ("create the CA, server and client certificates", _certs),
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
