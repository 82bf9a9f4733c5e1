"""Summarise a py-spy raw profile recorded with --threads: per thread, inclusive top functions.

    python spy_threads.py PROFILE [TOP] [--process FUNCTION]

``--process``: with ``py-spy record --subprocesses``, only the process one of whose stacks runs
FUNCTION (e.g. ``_serve (serve_load.py``: the server of a load run).
"""
import collections
import sys

args = sys.argv[1:]
only = None
if "--process" in args:
    i = args.index("--process")
    only, args = args[i + 1], args[:i] + args[i + 2:]
lines = open(args[0], errors="replace").read().splitlines()


def process_of(frames: list[str]) -> str:
    return next((f for f in reversed(frames) if f.startswith("process ")), "")


if only is not None:
    wanted = {process_of(line.split(";")) for line in lines if only in line}
    lines = [line for line in lines if process_of(line.split(";")) in wanted]
inc = collections.defaultdict(collections.Counter)
total = collections.Counter()
for line in lines:
    stack, _, n = line.rpartition(" ")
    if not n.isdigit():
        continue
    n = int(n)
    frames = stack.split(";")
    idx = [i for i, f in enumerate(frames) if f.startswith("thread ")]
    thread = frames[idx[0]].split("): ", 1)[-1][:60] if idx else "?"
    body = frames[idx[0] + 1:] if idx else frames
    total[thread] += n
    seen = set()
    for f in body:
        if f not in seen:
            inc[thread][f] += n
            seen.add(f)
for thread, t in total.most_common(8):
    print(f"\n=== {thread}: {t} samples")
    for f, n in inc[thread].most_common(int(args[1]) if len(args) > 1 else 45):
        print(f"{n:6d} {100 * n / t:5.1f}% {f[:150]}")
