#!/bin/bash
# Call 2 of the Q8_0 kernel search (device): the FMA kernel for few rows, the weight-scale kernel for many.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/smi.txt
F="-.64.64.-.4.-.-.-.0.fma,-.128.64.-.8.-.-.-.0.fma,-.256.64.-.8.-.-.-.0.fma,-.128.32.-.4.-.-.-.0.fma,-.64.64.-.2.-.-.-.0.fma,-.128.64.-.8.-.-.cast.0.fma,-.128.64.-.8.-.32.-.0.fma,-.64.128.-.4.-.-.-.0.fma"
M1="$F,-.-.-.-.-.-.16.-.0"
M4="-.64.64.-.4.-.-.-.0.fma,-.128.64.-.8.-.-.-.0.fma,-.256.64.-.8.-.-.-.0.fma,-.128.32.-.4.-.-.-.0.fma,-.128.64.-.8.-.-.cast.0.fma,auto,-.-.-.-.8.-.-.-.0"
M8="4.128.64.-.8.-.-.-.0.fma,8.128.64.-.8.-.-.-.0.fma,4.128.32.-.4.-.-.-.0.fma,-.-.-.-.8.-.-.-.0,-.-.128.-.8.-.-.-.0,-.-.-.-.-.-.-.-.0.wscale,16.-.-.-.4.-.-.-.0.wscale"
M16="-.-.128.-.8.-.-.-.0,-.-.-.-.8.-.-.-.0,-.-.-.-.-.-.-.-.0.wscale,-.-.64.-.4.-.-.-.0.wscale,-.-.-.-.-.2.-.-.0.wscale,-.64.-.-.-.-.-.-.0.wscale,-.-.-.-.-.-.-.cast.0.wscale"
M64="-.-.-.-.-.-.-.-.0.wscale,-.-.64.-.-.-.-.-.0.wscale,-.-.256.-.-.-.-.-.0.wscale,-.-.-.-.4.-.-.-.0.wscale,-.-.-.-.-.2.-.-.0.wscale,-.-.-.-.-.4.-.-.0.wscale,-.-.-.-.-.-.-.cast.0.wscale,32.-.-.-.4.-.-.-.0.wscale,-.64.-.-.-.-.-.-.0.wscale"
M128="-.-.-.-.-.-.-.-.0.wscale,-.-.64.-.-.-.-.-.0.wscale,-.-.-.-.-.2.-.-.0.wscale,-.256.64.-.-.-.-.-.0.wscale"
P="4096:1000:3=-.128.64.-.8.-.-.-.0.fma,-.-.-.-.-.-.-.-.0.wscale;4096:12288:1=-.64.64.-.4.-.-.-.0.fma,-.128.64.-.8.-.-.-.0.fma,-.128.32.-.4.-.-.-.0.fma,-.64.64.-.2.-.-.-.0.fma,-.-.-.-.-.-.16.-.0;4096:12288:64=-.-.-.-.-.-.-.-.0.wscale,-.-.64.-.-.-.-.-.0.wscale,-.-.-.-.-.2.-.-.0.wscale;4096:12288:4=-.128.64.-.8.-.-.-.0.fma,-.128.32.-.4.-.-.-.0.fma,-.-.-.-.8.-.-.-.0;4096:12288:16=-.-.-.-.-.-.-.-.0.wscale,-.-.128.-.8.-.-.-.0;4096:4096:1=-.64.64.-.4.-.-.-.0.fma,-.128.64.-.8.-.-.-.0.fma,-.-.-.-.-.-.-.-.0"
timeout 90 python3 bench/q8_experiments.py --points "$P" --bytes 3e8 --budget-s 75 --baselines xla_bf16,v2 --out $OUT/r2.jsonl 2>&1 | grep -v -i deprecat | tee $OUT/call2.txt
