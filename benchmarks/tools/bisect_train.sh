#!/bin/bash
# git bisect run step: ours/local ms per step of GPT-2 small 8x1024 on one GPU; > 1.6: bad.
# Usage (older commits lack this file: run a copy): cp benchmarks/tools/bisect_train.sh /tmp/ && git bisect start BAD GOOD && OUT=dir git bisect run /tmp/bisect_train.sh
sha=$(git rev-parse --short HEAD)
out=/tmp/b_$sha.json
timeout 150 python benchmarks/train.py --model small --device cuda --no-lightning --no-hand-built \
  --batch 8 --seq 1024 --steps 8 --warmup 3 --json $out > /tmp/log_$sha.txt 2>&1 || { tail -5 /tmp/log_$sha.txt; echo "SKIP $sha" >> $OUT/bisect.txt; exit 125; }
python3 - "$out" "$sha" <<'PY'
import json, os, sys
d = json.load(open(sys.argv[1])); r = d["runs"]
q = r["ours"]["median_step_ms"] / r["local"]["median_step_ms"]
line = f"{sys.argv[2]} ours {r['ours']['median_step_ms']:.1f} local {r['local']['median_step_ms']:.1f} ratio {q:.3f}"
print(line); open(os.environ["OUT"] + "/bisect.txt", "a").write(line + "\n")
sys.exit(1 if q > 1.6 else 0)
PY
