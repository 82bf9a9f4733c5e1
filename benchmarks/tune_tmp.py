import json, os, statistics, sys, tempfile, time
sys.path.insert(0, os.path.dirname(__file__)); sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
import transport as T
from lightning_split.channel import ChannelConfig, make_certs
if os.environ.get("SW"): sys.setswitchinterval(float(os.environ["SW"]))
V = {
 "base": {},
 "nocrc": {"checksum": False},
 "frame": {"http2_max_frame_bytes": 16777215},
 "frame+la": {"http2_max_frame_bytes": 16777215, "http2_lookahead_bytes": 16 << 20},
 "frame+la+nocrc": {"http2_max_frame_bytes": 16777215, "http2_lookahead_bytes": 16 << 20, "checksum": False},
 "256K+frame+la": {"chunk_size": 256 << 10, "http2_max_frame_bytes": 16777215, "http2_lookahead_bytes": 16 << 20},
 "4M+frame+la": {"chunk_size": 4 << 20, "http2_max_frame_bytes": 16777215, "http2_lookahead_bytes": 16 << 20},
 "4M+frame+la+nocrc": {"chunk_size": 4 << 20, "http2_max_frame_bytes": 16777215, "http2_lookahead_bytes": 16 << 20, "checksum": False},
}
if __name__ == "__main__":
    pki = tempfile.mkdtemp(); make_certs(pki, client_ids=["client"])
    names = os.environ.get("ONLY", ",".join(V)).split(",")
    for size_mib in [float(x) for x in os.environ.get("SIZES", "1,16,64").split(",")]:
        size = int(size_mib * 2**20)
        t = T.make_tensor(size, torch.float32, "cpu")
        times = {}
        for rep in range(int(os.environ.get("REPS", "2"))):
            for name in names + ["tcp"]:
                rt, close = T.tcp_round_trip() if name == "tcp" else T.channel_round_trip(pki, ChannelConfig(**V[name]))
                for _ in range(3): rt(t)
                for _ in range(int(os.environ.get("N", "8"))):
                    t0 = time.perf_counter(); rt(t); times.setdefault(name, []).append(time.perf_counter() - t0)
                close()
        print(f"-- {size_mib} MiB", flush=True)
        for k, ts in times.items():
            print(f"{k:22s} median {size/statistics.median(ts)/1e6:7.0f} MB/s  best {size/min(ts)/1e6:7.0f}", flush=True)
