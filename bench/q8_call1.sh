#!/bin/bash
# Call 1 of the Q8_0 kernel search (device): variants and tiles on Qwen3-8B shapes, M = 1..128.
# NOTE: at the time of this call (session 4), "auto" and "-" meant the mma kernel with its then defaults (BK 256, dot_blocks 16/BM, 4 warps, 3 stages, ~4 programs per SM); the default kernel is now wscale (v2), so append ".mma" to rerun these.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee $OUT/smi.txt
python3 - <<'PY' 2>&1 | tee $OUT/torchcopy.txt
import torch, time
x = torch.empty(1 << 31, dtype=torch.bfloat16, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): y.copy_(x)
torch.cuda.synchronize(); s = (time.perf_counter() - t) / 10
print(f"torch copy_ {2 * x.nbytes / s / 1e9:.0f} GB/s (read + write, 4 GiB)")
PY
M1="auto,-.-.-.-.-.-.-.cast.0,-.-.-.-.-.-.-.-.1,-.-.-.-.-.-.-.cast.1,-.64.-.-.-.-.-.-.0,-.64.512.16.-.-.-.-.0,-.-.-.-.-.2.-.-.0,-.-.-.-.-.4.-.-.0,-.-.-.-.8.-.-.-.0,4.-.256.4.-.-.-.-.0,-.256.-.-.-.-.-.-.0,-.-.-.-.-.-.16.-.0,-.-.-.-.-.-.4.-.0,-.-.128.4.-.4.-.-.0"
M8="auto,-.-.-.-.-.-.-.cast.0,-.-.-.-.-.-.-.-.1,-.-.-.4.-.-.-.-.0,-.64.-.-.-.-.-.-.0,-.-.-.-.-.4.-.-.0,-.-.-.-.8.-.-.-.0,-.-.128.-.-.4.-.-.0"
M16="auto,-.-.-.-.-.-.-.cast.0,-.-.-.-.-.-.-.-.1,-.-.-.2.-.-.-.-.0,-.-.128.-.-.-.-.-.0,-.64.-.-.-.-.-.-.0,-.-.-.-.8.-.-.-.0,-.-.-.-.-.4.-.-.0"
M64="auto,-.-.128.-.-.-.-.-.0,-.-.-.-.-.-.-.-.1,-.-.-.-.-.-.-.cast.0,-.-.-.-.8.-.-.-.0,-.64.-.-.-.-.-.-.0,32.-.-.-.-.-.-.-.0,-.-.-.-.8.-.-.-.1"
M128="auto,-.-.128.-.-.-.-.-.0,-.-.-.-.8.-.-.-.0,-.-.-.-.-.-.-.-.1,-.-.-.-.8.-.-.-.1"
P="4096:4096:1=$M1;4096:12288:1=$M1;12288:4096:1=$M1;4096:4096:8=$M8;4096:12288:8=$M8;4096:4096:16=$M16;4096:12288:16=$M16;4096:4096:64=$M64;4096:12288:64=$M64;4096:12288:128=$M128;4096:1024:1=auto,-.64.-.-.-.-.-.-.0"
timeout 480 python3 bench/q8_experiments.py --points "$P" --bytes 3e8 --budget-s 440 --baselines xla_bf16,v2,pallas_bf16 --out $OUT/r1.jsonl 2>&1 | grep -v -i deprecat | tee $OUT/call1.txt
