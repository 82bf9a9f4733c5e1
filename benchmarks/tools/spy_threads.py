"""Summarise a py-spy raw profile recorded with --threads: per thread, inclusive top functions."""
import collections
import sys

inc = collections.defaultdict(collections.Counter)
total = collections.Counter()
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip("\n").rpartition(" ")
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
for thread, t in total.most_common(6):
    print(f"\n=== {thread}: {t} samples")
    for f, n in inc[thread].most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 45):
        print(f"{n:6d} {100 * n / t:5.1f}% {f[:150]}")
