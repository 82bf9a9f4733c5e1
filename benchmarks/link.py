"""An emulated network link between a benchmark's client and its server: rate and round-trip delay.

    python benchmarks/link.py --rate 100mbit --rtt-ms 20      # root: build it, measure it with raw TCP

    with Link("1gbit", rtt_ms=20) as link:      # root only; torn down on exit, Ctrl-C and SIGTERM
        link.enter_client()                     # (loopback-ns: this process joins the namespace)
        link.popen_server(argv)                 # or in a spawned child: enter_netns(link.server_ns_path)
        # the server binds link.server_host; clients dial link.client_addr(port), TLS name link.server_name

Mode ``tun`` (default): the server side lives in a network namespace of its own, the client side in
this one, joined by two TUN devices (one in each) and a forwarding process of ours, the shuttle, that
reads each IP packet leaving one device and writes it into the other. A ``tc tbf`` qdisc on each
device's egress limits its direction; the shuttle holds every packet RTT/2 in a timestamped FIFO per
direction (read at t, written at t + RTT/2; a reader and a writer thread per direction, so neither
direction waits for the other and throughput is not cut to one packet per RTT). Why packets and not
a TCP proxy: netem is missing here, and a proxy delays only connections made to its address, while
gloo (the hand-built split) connects its ranks on ephemeral ports that only iptables (missing too)
could redirect. Delaying packets delays every connection alike, and TCP's congestion control and
HTTP/2's flow control see the real RTT, as on a real link.

tbf, each way: MTU = 1 ms at the rate, within 1500..65000 B (a small message waits at most ~1 ms
behind a full packet; the shuttle moves at most ~2k packets/s a direction); burst = max(two full
packets, 1 ms at the rate) (at least one packet; a large burst would let a whole activation through
unshaped, as linkns.sh's 4 MB does); queue (``latency``) = max(50 ms, 2 RTT) at the rate, at least
the bandwidth-delay product, so one TCP flow fills the link without tail drops.

Mode ``proxy``, for any host (no root, no ``ip``/``tc``): ``link_proxy.py``, a TCP forwarding proxy of
ours per server port, with the rate and RTT/2 in each direction; only connections to
``client_addr(port)`` cross it (not gloo's), and TCP never sees the delay (see that module).

Mode ``loopback-ns``, for a host without TUN: one namespace whose ``lo`` is tbf-limited (both
directions share the rate), both sides inside it (``enter_client()``); no delay. On the GPU machine
(no ``ip``/``tc``) ``source .dev/linkns.sh slow 1gbit`` (../shared/device/README.md) unpacks
iproute2 under /tmp/iprroot, which this module then uses, in either mode.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import fcntl
import itertools
import json
import os
import queue
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CLONE_NEWNET, TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x40000000, 0x400454CA, 0x0001, 0x1000
IPRROOT = Path(os.environ.get("LS_IPRROOT", "/tmp/iprroot"))  # where linkns.sh unpacks iproute2
PREFIX, MODES = "lslink-", ("tun", "loopback-ns", "proxy")
_count = itertools.count()
HOW_TO = ("no `ip`/`tc` here, none under {root}. On the GPU machine: copy ../shared/device into an ignored, "
          "carried folder (.dev), `source .dev/linkns.sh slow RATE` (unpacks iproute2 under /tmp/iprroot), "
          "rerun (mode loopback-ns if TUN fails); or run the benchmark as `$LINK_EXEC python ...` without a link")


class LinkError(RuntimeError):
    pass


def parse_rate(rate: str) -> int:
    """tc-style rate ("100mbit", "1gbit", "500kbit", "2e9") in bits per second."""
    m = re.fullmatch(r"([\d.e+]+)\s*([kmgt]?)(bit|bps)?", rate.strip().lower())
    if not m:
        raise ValueError(f"not a rate: {rate!r} (e.g. 100mbit, 1gbit)")
    bits = float(m[1]) * 1000 ** " kmgt".index(m[2] or " ") * (8 if m[3] == "bps" else 1)
    return int(bits)


def enter_netns(path: str | None) -> None:
    """Move the calling thread (threads and processes it starts later follow) into a network namespace."""
    if path:
        fd = os.open(path, os.O_RDONLY)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns({path}): {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)


def _tools() -> tuple[list[str], list[str]]:
    if shutil.which("ip") and shutil.which("tc"):
        return ["ip"], ["tc"]
    if (IPRROOT / "bin/ip").exists():
        env = ["env", f"LD_LIBRARY_PATH={IPRROOT}/usr/lib/x86_64-linux-gnu:{IPRROOT}/lib/x86_64-linux-gnu"]
        return [*env, str(IPRROOT / "bin/ip")], [*env, str(IPRROOT / "sbin/tc")]
    raise LinkError(HOW_TO.format(root=IPRROOT))


class Link:
    """One emulated link (see the module's docstring). ``rate``: tc style, each direction (``tun``)
    or both together (``loopback-ns``); ``rtt_ms``: round-trip delay added (``tun``, ``proxy``)."""

    def __init__(self, rate: str = "1gbit", rtt_ms: float = 0.0, mode: str = "tun") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "loopback-ns" and rtt_ms > 0:
            raise LinkError("loopback-ns adds no delay (nothing sits in a loopback's path): use mode 'tun'")
        self.rate, self.rate_bit_s, self.rtt_ms, self.mode = rate, parse_rate(rate), float(rtt_ms), mode
        per_ms = self.rate_bit_s // 8000  # bytes the link moves in 1 ms
        self.mtu = min(65000, max(1500, per_ms))
        self.burst, self.latency_ms = max(2 * self.mtu, per_ms), max(50.0, 2 * self.rtt_ms)
        n, pid = next(_count), os.getpid()
        self.server_ns = f"{PREFIX}{pid}-{n}"
        self.server_ns_path = f"/run/netns/{self.server_ns}"
        self.client_iface, self.server_iface = f"lsc{pid}x{n}", f"lss{pid}x{n}"
        hi, lo = divmod(((pid * 8 + n) % 16384) * 4, 256)  # a /30 of 10.99/16 per link
        self.client_host, self.server_host = f"10.99.{hi}.{lo + 1}", f"10.99.{hi}.{lo + 2}"
        if mode in ("loopback-ns", "proxy"):
            self.client_host = self.server_host = "127.0.0.1"
            self.client_iface = self.server_iface = "lo"
        if mode == "proxy":  # no namespace: the server is a process of this host
            self.server_ns_path = None
        self.server_name = "localhost"  # a name in our certificates' SANs (10.99.x.y is not)
        self.client_ns_path = self.server_ns_path if mode == "loopback-ns" else None
        self._proxies: dict[int, tuple[subprocess.Popen, int]] = {}  # mode proxy: by server port
        self.measured: dict[str, float] = {}  # by measure()
        self._shuttle: subprocess.Popen | None = None
        self._up = False

    # -- what a benchmark uses -------------------------------------------------------------------
    def client_addr(self, port: int) -> str:
        if self.mode == "proxy":  # the proxy in front of that port (started on first use)
            return f"{self.server_host}:{self._proxy_port(port)}"
        return f"{self.server_host}:{port}"

    def popen_server(self, argv: list[str], **kw: Any) -> subprocess.Popen:
        """``argv`` run in the server's namespace (``ip netns exec NS``, our LD_LIBRARY_PATH kept)."""
        if self.mode == "proxy":
            return subprocess.Popen(argv, **kw)
        keep = f"LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH', '')}"
        return subprocess.Popen([*_tools()[0], "netns", "exec", self.server_ns, "env", keep, *argv], **kw)

    def enter_client(self) -> None:
        """loopback-ns: move the calling thread (and so what it starts later) into the shaped namespace."""
        enter_netns(self.client_ns_path)

    def describe(self) -> dict[str, Any]:
        if self.mode == "proxy":
            return {"mode": self.mode, "rate": self.rate, "rate_bit_s": self.rate_bit_s, "rtt_ms": self.rtt_ms,
                    "shared_by_both_directions": False, "tcp_sees_delay": False}
        return {"mode": self.mode, "rate": self.rate, "rate_bit_s": self.rate_bit_s, "rtt_ms": self.rtt_ms,
                "mtu": self.mtu, "tbf_burst_bytes": self.burst, "tbf_latency_ms": self.latency_ms,
                "shared_by_both_directions": self.mode == "loopback-ns"}

    def __str__(self) -> str:
        both = " (both directions together)" if self.mode == "loopback-ns" else " each way"
        return f"{self.rate}{both}, +{self.rtt_ms:g} ms RTT ({self.mode})"

    # -- set-up and tear-down --------------------------------------------------------------------
    def _run(self, *argv: str, tool: int = 0) -> None:
        cmd = _tools()[tool] + list(argv)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise LinkError(f"{' '.join(cmd)}: {done.stderr.strip()}")

    def _tbf(self, ns: str, dev: str) -> None:
        self._run(*_netns_arg(ns), "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{self.rate_bit_s}bit",
                  "burst", str(self.burst), "latency", f"{self.latency_ms:g}ms", tool=1)

    def _proxy_port(self, port: int) -> int:
        if port not in self._proxies:
            proxy = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve().with_name("link_proxy.py")), str(port),
                 str(self.rate_bit_s), str(self.rtt_ms / 2e3)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            line = proxy.stdout.readline().strip()
            if not line.isdigit():
                proxy.kill()
                raise LinkError(f"the link's proxy for port {port} did not start")
            self._proxies[port] = (proxy, int(line))
        return self._proxies[port][1]

    def __enter__(self) -> Link:
        if self.mode == "proxy":  # user space only: nothing to set up until a port is dialled
            self._up = True
            atexit.register(self.close)
            return self
        if os.geteuid() != 0:
            raise LinkError("an emulated link needs root (network namespaces, tc); run as root or with sudo")
        ip, _ = _tools()
        _remove_stale(ip)
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: __exit__ cleans up
        self._up = True
        try:
            self._run("netns", "add", self.server_ns)
            self._run("-n", self.server_ns, "link", "set", "lo", "up")
            if self.mode == "loopback-ns":
                self._run("-n", self.server_ns, "link", "set", "lo", "mtu", str(self.mtu))
                self._tbf(self.server_ns, "lo")
                return self
            if not os.path.exists("/dev/net/tun"):
                raise LinkError("no /dev/net/tun here: use mode 'loopback-ns' (no delay)")
            self._shuttle = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--_shuttle", self.client_iface,
                 self.server_iface, str(self.rtt_ms / 2e3)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            if self._shuttle.stdout.readline().strip() != "ready":
                raise LinkError("the link's shuttle process did not start (TUN devices?)")
            self._run("link", "set", self.server_iface, "netns", self.server_ns)
            for ns, dev, me, peer in (("", self.client_iface, self.client_host, self.server_host),
                                      (self.server_ns, self.server_iface, self.server_host, self.client_host)):
                self._run(*_netns_arg(ns), "addr", "add", me, "peer", peer, "dev", dev)
                self._run(*_netns_arg(ns), "link", "set", dev, "mtu", str(self.mtu), "up")
                self._tbf(ns, dev)
            return self
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if not self._up:
            return
        self._up = False
        for proxy, _ in self._proxies.values():  # a proxy exits when its stdin closes
            proxy.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proxy.wait(5)
            proxy.kill()
        self._proxies.clear()
        if self.mode == "proxy":
            return
        if self._shuttle is not None:  # its TUN devices go with it
            self._shuttle.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._shuttle.wait(5)
            self._shuttle.kill()
        subprocess.run([*_tools()[0], "netns", "del", self.server_ns], capture_output=True)

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- measuring it ----------------------------------------------------------------------------
    def measure(self, seconds: float = 1.0, pings: int = 20) -> dict[str, float]:
        """Raw TCP across the link, from the client side (after ``enter_client()``): bulk throughput each
        way (at the receiver, after the first quarter of the bytes: slow start excluded) and the median
        round trip of a 64-byte message."""
        probe = self.popen_server([sys.executable, str(Path(__file__).resolve()), "--_probe", self.server_host],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            host, port = self.client_addr(int(probe.stdout.readline())).rsplit(":", 1)
            addr = (host, int(port))
            n = int(min(512e6, max(2e6, self.rate_bit_s / 8 * seconds)))
            rtt = 1e3 * _client(addr, b"E", pings)
            up, down = _client(addr, b"U", n), _client(addr, b"D", n)
        finally:
            probe.stdin.close()
            probe.wait(10)
        self.measured = {"c2s_mbit_s": round(up / 1e6, 1), "s2c_mbit_s": round(down / 1e6, 1),
                         "rtt_ms": round(rtt, 2), "bulk_bytes": n}
        return self.measured


def _netns_arg(ns: str) -> list[str]:
    return ["-n", ns] if ns else []


def _remove_stale(ip: list[str]) -> None:
    """Namespaces of earlier links whose process is gone (killed with SIGKILL, say)."""
    names = subprocess.run([*ip, "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in names:
        m = re.fullmatch(rf"{PREFIX}(\d+)-\d+", name)
        if m and not os.path.exists(f"/proc/{m[1]}"):
            subprocess.run([*ip, "netns", "del", name], capture_output=True)


# -- the shuttle: TUN <-> TUN, RTT/2 each way -----------------------------------------------------------

def _pump(src: int, dst: int, delay: float) -> None:
    """Forward packets src -> dst, each written ``delay`` s after it was read (a timestamped FIFO:
    the reader never waits for the writer, so many packets are in flight at once)."""
    fifo: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        while True:
            pkt = os.read(src, 65536)
            if delay <= 0:
                _write(dst, pkt)
            else:
                fifo.put((time.monotonic() + delay, pkt))

    def write() -> None:
        while True:
            due, pkt = fifo.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            _write(dst, pkt)

    for fn in (read, write) if delay > 0 else (read,):
        threading.Thread(target=fn, daemon=True).start()


def _write(fd: int, pkt: bytes) -> None:
    with contextlib.suppress(OSError):  # a device going down as the link closes
        os.write(fd, pkt)


def _shuttle(client_iface: str, server_iface: str, delay: float) -> None:
    with contextlib.suppress(OSError):
        os.nice(-10)  # ahead of the benchmark's own processes on a busy host
    fds = []
    for name in (client_iface, server_iface):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        fds.append(fd)
    _pump(fds[0], fds[1], delay)
    _pump(fds[1], fds[0], delay)
    print("ready", flush=True)
    sys.stdin.read()  # until the Link closes it (or its process dies): the devices vanish with us
    os._exit(0)


# -- the probe: raw TCP server in the server's namespace --------------------------------------------------

def _exact(sock: socket.socket, n: int) -> bytes:
    data = sock.recv(n, socket.MSG_WAITALL)
    if len(data) < n:
        raise ConnectionError("closed early")
    return data


def _sink(sock: socket.socket, n: int) -> float:
    """Receive n bytes; bits/s over the last three quarters of them."""
    buf, got, mark = bytearray(1 << 20), 0, None
    while got < n:
        k = sock.recv_into(buf, min(len(buf), n - got))
        if not k:
            raise ConnectionError("closed early")
        got += k
        if mark is None and got >= n // 4:
            mark = (time.perf_counter(), got)
    return 8 * (got - mark[1]) / max(time.perf_counter() - mark[0], 1e-9)


def _source(sock: socket.socket, n: int) -> None:
    chunk = memoryview(bytes(1 << 20))
    while n > 0:
        sock.sendall(chunk[:min(n, len(chunk))])
        n -= len(chunk)


def _probe(host: str) -> None:
    srv = socket.create_server((host, 0))
    print(srv.getsockname()[1], flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cmd, n = struct.unpack("!cQ", _exact(conn, 9))
            if cmd == b"E":
                while data := conn.recv(65536):
                    conn.sendall(data)
            elif cmd == b"U":
                conn.sendall(struct.pack("!d", _sink(conn, n)))
            else:
                _source(conn, n)


def _client(addr: tuple[str, int], cmd: bytes, n: int) -> float:
    """E: median round trip (s) of n 64-byte messages; U/D: bits/s of n bytes up or down."""
    with socket.create_connection(addr, timeout=120) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(struct.pack("!cQ", cmd, n))
        if cmd == b"D":
            return _sink(sock, n)
        if cmd == b"U":
            _source(sock, n)
            return struct.unpack("!d", _exact(sock, 8))[0]
        times = []
        for _ in range(n + 3):
            t0 = time.perf_counter()
            sock.sendall(b"x" * 64)
            _exact(sock, 64)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[3:])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_shuttle"]:
        _shuttle(argv[1], argv[2], float(argv[3]))
    if argv[:1] == ["--_probe"]:
        _probe(argv[1])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", default="100mbit", help="tc rate, e.g. 100mbit, 1gbit (default 100mbit)")
    p.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip delay to add (default 0)")
    p.add_argument("--mode", choices=MODES, default="tun")
    p.add_argument("--seconds", type=float, default=1.0, help="bulk transfer size, in seconds at the rate")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = p.parse_args(argv)
    try:
        with Link(args.rate, args.rtt_ms, args.mode) as link:
            link.enter_client()
            measured = link.measure(args.seconds)
    except LinkError as e:
        print(f"link: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps({"configured": link.describe(), "measured": measured}))
    else:
        shaping = f": MTU {link.mtu}, tbf burst {link.burst} B, queue {link.latency_ms:g} ms"
        shaping = "" if link.mode == "proxy" else shaping
        print(f"link {link}{shaping}")
        print(f"  measured (raw TCP): client->server {measured['c2s_mbit_s']:.1f} Mbit/s, "
              f"server->client {measured['s2c_mbit_s']:.1f} Mbit/s, 64 B round trip {measured['rtt_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
