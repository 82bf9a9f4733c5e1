#!/bin/bash
# train.py in the checkout TREE under py-spy (every process, 50 Hz); its per-thread summary to $OUT/NAME.txt
# Usage: SPY=$(which py-spy) OUT=dir benchmarks/tools/spy_train.sh TREE NAME train.py-args...
tree=$1; name=$2; shift 2
(cd $tree && timeout 250 $SPY record --subprocesses --nonblocking --threads --rate 50 --format raw -o /tmp/$name.raw -- python benchmarks/train.py "$@" > /tmp/$name.log 2>&1)
grep -E "^(ours|local) " /tmp/$name.log | head -3; tail -2 /tmp/$name.log
python3 $(dirname $(readlink -f $0))/spy_threads.py /tmp/$name.raw 45 > $OUT/$name.txt
