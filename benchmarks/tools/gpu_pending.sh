#!/bin/bash
# The one-GPU measurements the open issues wait for, as named steps of one device call. Each step
# has its own time limit and writes one JSON to $OUT (the device returns a few files only).
#
#   benchmarks/tools/gpu_pending.sh anchor spec gen link100     # on the lent H200, PYTHONPATH set up
#
#   anchor   #21 same host: ours against naive_split.py (.dev/naive_split.py) in the same run   ~90 s
#   spec     #22 speculative decoding, GPT-2 small, RTT 0/20/80 through link_proxy.py          ~200 s
#   gen      #22 the client on Hugging Face's static cache beside local static                 ~100 s
#   link100  #21 100 Mbit/s each way (TUN link), the library's defaults and the hand-built     ~200 s
#   load16   #19 serve_load 1 and 16 clients under py-spy: where the server's time goes        ~300 s
#   switch16 #19 serve_load 16 clients, the server's GIL switch interval 0.5 ms against 5        ~300 s
#   cores16  #19 serve_load 16 clients, the server on 4 and on 8 cores of its own, clients on the rest,
#            then 4 server processes again (each now with its share of torch's threads)               ~360 s
#
# On nvidia-h200-x2 (#19 and #21's two-GPU rows), the same way: gpu_pending.sh x2tests x2load x2train
#   x2tests  the CUDA tests, two-GPU parity among them                                       ~240 s
#   x2load   serve_load: 16 and 64 clients, the segment spread and replicated over both GPUs ~400 s
#   x2train  train.py with the server on the second GPU, against naive_split.py            ~120 s
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
small="--model small --device cuda"
for step in "$@"; do
    echo "== $step $(date +%T)"
    case $step in
        anchor) timeout 150 python benchmarks/train.py $small --no-lightning --batch 8 --seq 1024 --steps 20 \
                    --warmup 3 --anchor .dev/naive_split.py --json "$OUT/train_anchor.json" 2>&1 | tail -25 ;;
        spec) timeout 260 python benchmarks/speculative.py $small --rtts 0 20 80 --link-mode proxy --draft self \
                  --draftings plain "prompt lookup" --steps 3 --json "$OUT/speculative.json" 2>&1 | tail -22 ;;
        gen) timeout 180 python benchmarks/generate.py $small --decode-top-k 64 --steps 5 --shapes u_shape \
                 --also-client-static --json "$OUT/generate.json" 2>&1 | tail -16 ;;
        link100) mkdir -p /tmp/iprroot && for f in .dev/ipr/*.deb; do dpkg -x "$f" /tmp/iprroot; done  # link.py's ip, tc
                 timeout 300 python benchmarks/train.py $small --no-lightning --link 100mbit --also-wire int8 auto \
                     --also-hand-built-wire bf16 int8 --batch 8 --seq 512 --steps 16 --warmup 4 \
                     --json "$OUT/train_link100.json" 2>&1 | tail -30 ;;
        load16) timeout 420 ${SPY:-/tmp/site/bin/py-spy} record --subprocesses --nonblocking --threads --rate 25 \
                    --format raw -o /tmp/load16.raw -- python benchmarks/serve_load.py --device cuda --clients 1 16 \
                    --train-clients --json "$OUT/serve_load_16_spy.json" 2>&1 | grep -v "^py-spy" | tail -12
                python3 benchmarks/tools/spy_threads.py /tmp/load16.raw 40 --process "_serve (serve_load" \
                    > "$OUT/serve_load_16_server_spy.txt" ;;
        switch16) for ms in 5 0.5; do
                      timeout 200 python benchmarks/serve_load.py --device cuda --clients 1 16 --train-clients \
                          --server-switch-ms $ms --json "$OUT/serve_load_16_switch$ms.json" 2>&1 | tail -7
                  done ;;
        cores16) for n in 4 8; do
                     timeout 150 python benchmarks/serve_load.py --device cuda --clients 1 16 --train-clients \
                         --server-cores $n --json "$OUT/serve_load_16_cores$n.json" 2>&1 | tail -7
                 done
                 timeout 150 python benchmarks/serve_load.py --device cuda --clients 1 16 --train-clients \
                     --server-processes 4 --json "$OUT/serve_load_16_procs4.json" 2>&1 | tail -7 ;;
        x2tests) timeout 400 python -m pytest -q -ra tests/test_cuda.py tests/test_cuda_hostile.py \
                     tests/test_placement.py tests/test_batching.py 2>&1 | tail -15 ;;
        x2load) for placement in spread replicate; do
                    timeout 300 python benchmarks/serve_load.py --device cuda --clients 16 64 --server-devices 0 1 \
                        --placement $placement --train-clients --json "$OUT/serve_load_x2_$placement.json" 2>&1 | tail -12
                done ;;
        x2train) timeout 200 python benchmarks/train.py $small --no-lightning --batch 8 --seq 1024 --steps 20 \
                     --warmup 3 --server-device cuda:1 --anchor .dev/naive_split.py \
                     --json "$OUT/train_x2_anchor.json" 2>&1 | tail -25 ;;
        *) echo "unknown step $step" ;;
    esac
done
