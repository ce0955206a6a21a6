#!/usr/bin/env bash
# The next device session's calls, one per argument (bench/notes_gpu.md says why each): on the device,
#   bash bench/device/next.sh dflash27b 8   (carry [".cache/whl"]; about 5 minutes each; give_back after each call)
# Logs and results go to $OUT.
cd "$(dirname "$0")/../.." && source bench/device/env.sh
case "${1:?which call}" in
  q8)  # the Mosaic Q8_0 tiles by rows (register budget) and the pre-scaled variant: tests, per-layer products
    timeout 200 python3 -m pytest -q -m gpu tests/test_q8_0_matmul_mgpu.py 2>&1 | tee $OUT/q8_tests.log | tail -4
    timeout 300 python3 bench/weight_matmul.py --plan \
      "qwen3.6-27b:1,8,64,128:mgpu_q8_0,mgpu_q8_0p,pallas_q8_0;qwen3-8b:1,128:mgpu_q8_0,mgpu_q8_0p" --budget-s 280 \
      --out $OUT/q8_layers.jsonl 2>&1 | tee $OUT/q8_layers.log | grep -E "LAYER|check|copy" ;;
  q8step)  # the 27B steps with both Q8_0 variants (was 15.657 / 71.623 ms at 8 slots)
    S="python3 bench/spec_step.py --target qwen35-27b --weights q8_0 --slots 8,1 --steps plain,spec --iters 10"
    timeout 250 $S --out $OUT/step27b.jsonl 2>&1 | tee $OUT/step27b.log | grep -E "ms/step|spec/plain"
    DFLASH_Q8_PRESCALE=1 timeout 250 $S --out $OUT/step27b_p.jsonl 2>&1 | tee $OUT/step27b_p.log \
      | grep -E "ms/step|spec/plain" ;;
  gdncheck)  # session 12 first: the 16 x 2 delta-rule tiles (default since session 11, timed per call, not yet tested
  # on a GPU): GPU tests, then the 27B steps as an 8-slot engine runs them (session 11: 19.198 / 56.648 ms at 8 slots)
    timeout 200 python3 -m pytest -q -m gpu tests/test_qwen35.py tests/test_batch_invariance.py \
      -k "recurrent_kernel_gpu or hybrid" 2>&1 | tee $OUT/gdncheck_tests.log | tail -3
    timeout 250 python3 bench/spec_step.py --target qwen35-27b --weights q8_0 --slots 8,1 --steps plain,spec \
      --iters 10 --batch-invariant --out $OUT/step27b_gdn16.jsonl 2>&1 | tee $OUT/step27b_gdn16.log \
      | grep -E "ms/step|spec/plain" ;;
  gdnbits)  # session 12: 16 x 2 tiles failed "a 16-token call in the bits of 16 one-token calls" at the 27B shape;
  # which tiles keep the bits (s: one-token blocks, the old way), and their times; then the GPU tests again
    timeout 300 python3 bench/delta_rule.py --slots 8,1 --configs 16x2,16x2s,32x2,16x4,32x4,32x4s,16x2u --bits \
      --prefill "" --out $OUT/gdnbits.jsonl 2>&1 | tee $OUT/gdnbits.log | grep -v Warn
    timeout 200 python3 -m pytest -q -m gpu tests/test_qwen35.py tests/test_batch_invariance.py \
      -k "recurrent_kernel_gpu or hybrid" 2>&1 | tee $OUT/gdnbits_tests.log | tail -3 ;;
  q8auto)  # session 11: the Q8_0 variant chosen per call (use_prescale) and per engine (engine_prescale): GPU row-bits
  # tests, then the 27B steps in the batch-invariant mode as an 8-slot engine runs them, and with the mode off
    timeout 150 python3 -m pytest -q -m gpu tests/test_batch_invariance.py -k "product_rows and gpu-mgpu" 2>&1 \
      | tee $OUT/q8auto_tests.log | tail -3
    S="python3 bench/spec_step.py --target qwen35-27b --weights q8_0 --slots 8,1 --steps plain,spec --iters 10"
    timeout 200 $S --batch-invariant --out $OUT/step27b_inv.jsonl 2>&1 | tee $OUT/step27b_inv.log \
      | grep -E "ms/step|spec/plain" ;;
  q8sweep)  # issue 8 (big products at 44-50 % of copy): more CTAs per SM through K splits, at M = 1 and 8
    timeout 400 python3 bench/weight_matmul.py --models "" --sweep 5120:17408:1,17408:5120:1,4096:12288:8 \
      --configs-mgpu-q8 128x2x4x4,128x4x4x4,64x2x4x4,64x4x4x4,64x8x4x4,128x2x8x2,128x2x4x4p,64x4x4x4p \
      --budget-s 380 --out $OUT/q8_sweep.jsonl 2>&1 | tee $OUT/q8_sweep.log | grep sweep ;;
  q8sweep2)  # issue 8, session 13: the first sweep (2-4 CTAs per SM: 1.3x at M = 1 and 8) over the 27B's big products,
  # BN x K splits with the picker's stages and blocks, at M = 1, 8 (plain steps) and 128 (the 8-slot verify)
    shapes=$(for s in 5120:17408 17408:5120 5120:10240 6144:5120 5120:12288; do for m in 1 8 128; do
      echo -n "$s:$m,"; done; done)
    timeout 420 python3 bench/weight_matmul.py --models "" --sweep ${shapes%,} \
      --configs-mgpu-q8 64x1,64x2,64x4,64x8,128x1,128x2,128x4,128x8 \
      --budget-s 400 --out $OUT/q8_sweep2.jsonl 2>&1 | tee $OUT/q8_sweep2.log | grep sweep ;;
  q8split)  # issue 8, session 13: K splits of at most $DFLASH_Q8_SPLIT_K inputs with 64-row tiles at M <= 16 (the
  # sweeps' winners) against the old picker (0): GPU tests at the most splits, then the 27B steps per setting
    DFLASH_Q8_SPLIT_K=1280 timeout 120 python3 -m pytest -q -m gpu tests/test_q8_0_matmul_mgpu.py \
      tests/test_batch_invariance.py -k "q8 or product_rows" 2>&1 | tee $OUT/q8split_tests.log | tail -3
    for sk in ${2:-1280 2560 0}; do
      DFLASH_Q8_SPLIT_K=$sk timeout 150 python3 bench/spec_step.py --target qwen35-27b --weights q8_0 --slots 8,1 \
        --steps plain,spec --iters 5 --batch-invariant --out $OUT/step27b_sk$sk.jsonl 2>&1 \
        | tee $OUT/step27b_sk$sk.log | grep -E "ms/step|spec/plain" | sed "s/^/split_k $sk /"
    done ;;
  gputests)  # session 13 changed the Q8_0 split rule after its device budget was spent, and keeps kernel lowerings
  # on disk: the Q8_0 and row-bits GPU tests, then the GPU engine tests twice (the second run reads the lowerings)
    timeout 250 python3 -m pytest -q -m gpu tests/test_q8_0_matmul_mgpu.py tests/test_batch_invariance.py \
      -k "q8 or product_rows" 2>&1 | tee $OUT/gputests_q8.log | tail -4
    for i in 1 2; do
      timeout 150 python3 -m pytest -q -m gpu tests/test_gpu_engine.py --durations 3 2>&1 \
        | tee $OUT/gputests_engine$i.log | tail -6
    done; ls ~/.cache/dflash-jax/mosaic | wc -l ;;
  q8pre)  # session 13: with more K splits, is the 8-slot engine's pre-scaled choice still right? Its steps with the
  # exact and the pre-scaled products (invariant mode forces one per engine; DFLASH_Q8_PRESCALE overrides it)
    for pre in 0 1; do
      DFLASH_Q8_PRESCALE=$pre timeout 130 python3 bench/spec_step.py --target qwen35-27b --weights q8_0 --slots 8 \
        --steps plain,spec --iters 5 --batch-invariant --out $OUT/step27b_pre$pre.jsonl 2>&1 \
        | tee $OUT/step27b_pre$pre.log | grep -E "ms/step|spec/plain" | sed "s/^/prescale $pre /"
    done ;;
  bf16sweep)  # issues 3 and 4: the 8B's float products run in XLA (65 % of copy per layer at M = 1; the 8-slot
  # verify's M = 128 qkv and o_proj fill half the SMs). Does the Mosaic bf16 kernel win with several CTAs per SM (the
  # Q8_0 kernel did, session 13)? XLA vs Mosaic per layer, then BNxBKxSPLITSxSTAGES at the 8B's fused shapes
  # (gate+up 24576, qkv 6144), M = 1, 8, 128
    timeout 150 python3 bench/weight_matmul.py --plan "qwen3-8b:1,8,128:xla_bf16,mgpu_bf16" --budget-s 140 \
      --out $OUT/bf16_layers.jsonl 2>&1 | tee $OUT/bf16_layers.log | grep -E "LAYER|copy"
    shapes=$(for s in 4096:24576 12288:4096 4096:4096 4096:6144; do for m in 1 8 128; do echo -n "$s:$m,"; done; done)
    timeout 400 python3 bench/weight_matmul.py --models "" --sweep ${shapes%,} --budget-s 380 \
      --configs-mgpu 64x256x1x4,64x256x2x4,64x256x4x4,64x256x8x4,128x256x1x4,128x256x2x4,128x256x4x4,64x128x4x4 \
      --out $OUT/bf16_sweep.jsonl 2>&1 | tee $OUT/bf16_sweep.log | grep sweep ;;
  bf16step)  # issues 3 and 4: the 8B steps (random bf16, 5-layer drafter) with XLA's float products (the default),
  # the Mosaic kernel's old split rule, and K splits of at most 1024 inputs (session 8: B1 plain 4.872, B8 plain
  # 4.875 / spec 7.995 ms, 1.64x)
    for v in xla mgpu mgpu1024; do
      env $([ $v != xla ] && echo DFLASH_MATMUL_IMPL=mgpu) $([ $v = mgpu1024 ] && echo DFLASH_MGPU_SPLIT_K=1024) \
        timeout 170 python3 bench/spec_step.py --target qwen3-8b --slots 8,1 --steps plain,spec --iters 40 \
        --out $OUT/step8b_$v.jsonl 2>&1 | tee $OUT/step8b_$v.log | grep -E "ms/step|spec/plain" | sed "s/^/$v /"
    done ;;
  gdn)  # the delta-rule kernel's tiles at the 27B shape, and the 27B Q8_0 prefill
    timeout 200 python3 bench/delta_rule.py --slots 1,8 --configs 32x4,32x4p,32x4u,32x4o,32x4uo,32x2,32x2u,16x2,16x2u,16x2uo,64x4,64x4u,128x8 \
      --prefill 256 --out $OUT/gdn.jsonl 2>&1 | tee $OUT/gdn.log | tail -40
    timeout 200 python3 bench/prefill_step.py --target qwen35-27b --weights q8_0 --prompt 512 --chunks 256,512 \
      --modes off,on --iters 3 --out $OUT/prefill27b.jsonl 2>&1 | tee $OUT/prefill27b.log | tail -6 ;;
  q8prefill)  # issue 7's 2-slot gap (138.3 vs llama.cpp's 144 tok/s; ~0.42 of its 3.70 s is two 2 x 512-token
  # prefills): prefill's Q8_0 products in the decode steps' K splits ($DFLASH_Q8_PREFILL_SPLIT_K) against the old rule
    for sk in 0 2560; do for sl in 1 2; do
      DFLASH_Q8_PREFILL_SPLIT_K=$sk timeout 140 python3 bench/prefill_step.py --target qwen35-27b --weights q8_0 \
        --prompt 512 --chunks 256 --slots $sl --modes on --iters 3 --out $OUT/prefill27b_sk${sk}_s$sl.jsonl 2>&1 \
        | tee $OUT/prefill27b_sk${sk}_s$sl.log | tail -2 | sed "s/^/prefill split_k $sk slots $sl /"
    done; done ;;
  q8psweep)  # the 8- and 16-slot engines' pre-scaled products at M = 1 and 8 (one client: 67.2 tok/s against the
  # smaller engines' 75.6 with exact products): BN 64 vs 128 x K splits, the pre-scaled variant only
    shapes=$(for s in 5120:17408 17408:5120 5120:10240 6144:5120 5120:12288; do for m in 1 8; do
      echo -n "$s:$m,"; done; done)
    timeout 300 python3 bench/weight_matmul.py --models "" --sweep ${shapes%,} \
      --configs-mgpu-q8 64x2p,64x4p,64x8p,128x2p,128x4p,128x8p --budget-s 280 --out $OUT/q8_psweep.jsonl 2>&1 \
      | tee $OUT/q8_psweep.log | grep sweep ;;
  adaptive27b)  # the default (adaptive) policy with shadow probes on the GPU, 27B, random drafter (tau ~1): it should
  # decode plainly and lose only its probes against plain; one engine each, 8 slots (~300 s)
    timeout 500 python3 bench/engine_random.py --target qwen35-27b --weights q8_0 --slots 8 --concurrency 1,8 \
      --chunk-buckets 256 --modes adaptive,plain --out $OUT/engine27b_adaptive.json 2>&1 \
      | tee $OUT/engine27b_adaptive.log | grep -v "%|" ;;
  plain27b|dflash27b)  # issue 7's serving table, one mode per call (`next.sh dflash27b 4`: a 4-slot engine; default 8).
  # A 27B 8-slot DFlash warm-up took 319 s (20 buckets with --chunk-buckets 256), plain 186 s on a warm compilation
  # cache: on a warm machine run dflash27b first, then plain27b
    slots=${2:-8} mode=${1%27b}
    timeout 470 python3 bench/engine_random.py --target qwen35-27b --weights q8_0 --slots $slots \
      --concurrency $(python3 -c "print(','.join(sorted({'1', str($slots)}, key=int)))") --chunk-buckets 256 \
      --modes $mode --out $OUT/engine27b_${mode}_s$slots.json 2>&1 | tee $OUT/engine27b_${mode}_s$slots.log \
      | grep -v "%|" ;;
  xlaflags)  # issues 3 and 4 (B8 spec/plain 1.64x, target 1.5x; B1 plain 74 % of copy, target 80 %): the 8-slot
  # verify's M = 128 qkv / o_proj GEMMs run as cuBLAS tiles that fill half the SMs. XLA's Triton GEMMs (split-K in
  # their autotuning space) for every product, and cuBLAS for every product, against the default
    for v in default tritononly cublasonly; do
      f=""; [ $v = tritononly ] && f="--xla_gpu_cublas_fallback=false"
      [ $v = cublasonly ] && f="--xla_gpu_enable_triton_gemm=false"
      XLA_FLAGS="$f" timeout 170 python3 bench/spec_step.py --target qwen3-8b --slots 8,1 --steps plain,spec \
        --iters 40 --out $OUT/step8b_$v.jsonl 2>&1 | tee $OUT/step8b_$v.log | grep -E "ms/step|spec/plain" \
        | sed "s/^/$v /"
    done ;;
  gemms)  # issue 4, session 15: the spec step's float GEMMs in cuBLAS (now the default through the spec and draft
  # steps' compiler options) with a profile, then K splits as a batch for products of >= 64 rows and <= 8192 outputs
    for v in default split2 split4; do
      sk=1:0:0; [ $v = split2 ] && sk=2:64:8192; [ $v = split4 ] && sk=4:64:8192
      prof=""; [ $v = default ] && prof="--profile 8:spec"
      DFLASH_XLA_SPLIT_K=$sk timeout 170 python3 bench/spec_step.py --target qwen3-8b --slots 8,1 \
        --steps plain,spec --iters 40 $prof --out $OUT/step8b_$v.jsonl 2>&1 | tee $OUT/step8b_$v.log \
        | grep -E "ms/step|spec/plain|busy| ms +[0-9.]+x " | head -40 | sed "s/^/$v /"
    done ;;
  firstengine)  # sessions 15-16: the first DFlash engine of a process serves SmolLM2 (bf16, H200) 1.2-1.5x slower
  # than the next ones with the same decisions (x0.97 vs x1.28 against plain at 8 slots); not seen on the CPU, not
  # Python's GC. With CUDA graphs off the first engine ran at half speed (1312.6 -> 659.0 tok/s); the later engines
  # (same executables) were cut by the timeout in session 16: time them here, graphs on and off (~300 s)
    for f in "" "--xla_gpu_enable_command_buffer="; do
      XLA_FLAGS="$f" timeout 145 python3 bench/engine_random.py --target smollm2-135m --slots 8 --concurrency 8 \
        --requests-per-client 2 --prompt 128 --max-tokens 256 --prefill-chunk 128 --chunk-buckets 128 \
        --modes dflash,dflash,dflash 2>&1 | tee -a $OUT/firstengine.log | grep -E "warm-up|clients" \
        | sed "s/^/XLA_FLAGS=$f /"
    done ;;
  blocks)  # issue 4, serving: the 8B spec step with block 8 against 16 at 8 and 16 slots (the shipped drafter's tau is
  # 2.35 at block 8 against 2.38 at 16; a verify of half the rows)
    for blk in 16 8; do
      timeout 170 python3 bench/spec_step.py --target qwen3-8b --slots 8,16 --steps plain,spec --iters 40 \
        --block $blk --out $OUT/step8b_block$blk.jsonl 2>&1 | tee $OUT/step8b_block$blk.log \
        | grep -E "ms/step|spec/plain" | sed "s/^/block $blk /"
    done ;;
  train6|train7)  # issue 5: a drafter run over back-to-back calls (files in /tmp live only while the machine stays
  # warm; move tests/data/vocab/*.gguf and the drafter asset out of the working tree for `copy` and `data|bench`).
  # `copy` (carry .cache/whl .cache/t1: HumanEval, the drafter to start from, the GGUF's first 43 MB), `data` (carry
  # .cache/t2: the rest), `fit` and `end` (one schedule over two calls), `bench` (after `copy`, in place of `data`).
  # train6 ran in session 16 (5000 steps from the session-5 drafter); train7 continues from train6's drafter on new
  # prompts (seed 7) plus 16 answers per HumanEval train task (the held-out set's own distribution)
    n=${1#train} T=/tmp/t6 M=/tmp/t6/smollm2.gguf
    steps=5000 end_s=430 data="$T/data6.jsonl"
    [ $n = 7 ] && steps=6800 end_s=470 data="$T/data7.jsonl $T/data7he.jsonl"
    R="python3 -m dflash_jax.train train --model $M --data $data --run $T/run$n --init-from
      $T/smollm2-135m-dflash.gguf --distill 0.5 --batch-size 16 --seq-len 768 --anchors 256 --ce-chunk 8192 --lr 3e-4
      --warmup 200 --steps $steps --eval-every 500 --ckpt-every 500 --val-seqs 64 --log-every 100 --dtype bfloat16"
    D="python3 -m dflash_jax.train data --model $M --max-tokens 384 --batch 512 --prompt-pad 512 --dtype bfloat16"
    case "${2:?copy|data|fit|end|bench}" in
      copy) mkdir -p $T && cp .cache/t1/* $T/ && ls -la $T ;;
      data) cp .cache/t2/* $T/ && cat $T/part_a $T/part_b > $M && md5sum $M && rm $T/part_a $T/part_b
        if [ $n = 7 ]; then
          timeout 100 $D --out $T/data7he.jsonl --humaneval $T/HumanEval.jsonl.gz --samples 16 --temperature 0.8 \
            --seed 7 2>&1 | tee $OUT/data7he.log | grep -v "%|" | tail -2
        fi
        timeout 480 $D --out $T/data$n.jsonl --humaneval $T/HumanEval.jsonl.gz --prompt-file default \
          --self-prompts 32768 --code-fraction 0.75 --samples 2 --temperature 0.6 --seed $((n == 7 ? 7 : 6)) 2>&1 \
          | tee $OUT/data$n.log | grep -v "%|" | tail -6; wc -l $T/data*.jsonl ;;
      fit) timeout 590 $R --stop-after 510 --no-resume 2>&1 | tee $OUT/fit$n.log | grep -v "%|" | grep -v '^{"step"' ;;
      end) timeout 570 $R --stop-after $end_s 2>&1 | tee $OUT/end$n.log | grep -v "%|" | grep -v '^{"step"'
        python3 -m dflash_jax.train export --run $T/run$n --out $OUT/smollm2-135m-dflash.gguf --tokenizer-source $M \
          --qtype q8_0 2>&1 | tail -2; cp $T/run$n/history.json $OUT/ ;;
      bench) cp .cache/t2/* $T/ && cat $T/part_a $T/part_b > $M && md5sum $M && rm $T/part_a $T/part_b
        for s in 8 1; do  # the drafter in $T served through the default policy, as session 15 ran the old one
          timeout 280 python3 bench/engine_throughput.py -m $M -md $T/smollm2-135m-dflash.gguf --slots $s \
            --max-tokens 512 --dtype bfloat16 --spec-policy adaptive,always,adaptive 2>&1 \
            | tee $OUT/smol_drafter_s$s.log | grep -v "%|" | tail -8; done ;;
    esac ;;
  ws)  # issues 4 and 8 (session 17): the warp-specialized Mosaic bf16 product (two compute warpgroups share the x
  # tile; BN 128) on the GPU for the first time: GPU tests, per-layer products against XLA and the one-warpgroup
  # kernel, then the 8B spec step with verify-sized products (>= 64 rows) in Mosaic, mode off and invariant
    timeout 150 python3 -m pytest -q -m gpu tests/test_weight_matmul_mgpu.py 2>&1 | tee $OUT/ws_tests.log | tail -3
    timeout 170 python3 bench/weight_matmul.py --plan "qwen3-8b:1,16,64,128,256:xla_bf16,mgpu_bf16,mgpu_bf16_ws" \
      --budget-s 160 --out $OUT/ws_layers.jsonl 2>&1 | tee $OUT/ws_layers.log | grep -E "LAYER|check|copy"
    S="python3 bench/spec_step.py --target qwen3-8b --slots 8,1 --steps plain,spec --iters 20"
    for v in xla verify1 verifyws invws; do
      e=""; [ $v = verify1 ] && e="DFLASH_MGPU_MIN_ROWS=64"
      [ $v = verifyws ] && e="DFLASH_MGPU_MIN_ROWS=64 DFLASH_MGPU_WS=1"
      b=""; [ $v = invws ] && e="DFLASH_MGPU_WS=1" && b="--batch-invariant"
      env $e timeout 100 $S $b --out $OUT/ws_step_$v.jsonl 2>&1 | tee $OUT/ws_step_$v.log | grep -E "ms/step|spec/plain"
    done ;;
  xlatune)  # issue 4 (session 18): the 128-row verify GEMMs are XLA's Triton tiles at ~52 % of copy; the WS Mosaic
  # kernel lost to them (ws). XLA's own search options for those tiles: exhaustive tiling, Triton warp
  # specialization (TMA and the dynamic search space are not flags of this XLA); plain and spec at 8 and 1 slots
    for v in ${2:-default exhaustive tritonws}; do
      f=""; t=100
      [ $v = exhaustive ] && f="--xla_gpu_exhaustive_tiling_search=true" && t=200
      [ $v = tritonws ] && f="--xla_gpu_experimental_enable_triton_warp_specialization=true"
      # fewer small kernels around the products (plain step: ~0.6 ms of ~2 us norm/add/rope/scatter kernels)
      [ $v = heroless ] && f="--xla_gpu_experimental_enable_triton_heroless_priority_fusion=true"
      [ $v = softmaxprio ] && f="--xla_gpu_experimental_enable_triton_softmax_priority_fusion=true"
      [ $v = multiout ] && f="--xla_gpu_unsupported_enable_triton_multi_output_fusion=true"
      XLA_FLAGS="$f" timeout $t python3 bench/spec_step.py --target qwen3-8b --slots 8,1 --steps plain,spec \
        --iters 20 --out $OUT/tune_$v.jsonl 2>&1 | tee $OUT/tune_$v.log | grep -E "ms/step|spec/plain|rror" \
        | sed "s/^/$v /"
    done ;;
  fusednorm)  # issue 3 (session 18): residual add + RMSNorm as one Pallas kernel (pallas_kernels/add_rms_norm.py)
  # in place of XLA's 2-3 small kernels per site (20 kernels per layer at one slot): GPU tests, then the 8B steps
  # with the kernel off and on, then the batch-invariant 8-slot step off and on
    timeout 60 python3 -m pytest -q -m gpu tests/test_add_rms_norm.py 2>&1 | tee $OUT/fn_tests.log | tail -2
    S="python3 bench/spec_step.py --target qwen3-8b --steps plain,spec --iters 20"
    for v in 0 1; do
      DFLASH_FUSED_NORM=$v timeout 80 $S --slots 8,1 --out $OUT/fn_$v.jsonl 2>&1 | tee $OUT/fn_$v.log \
        | grep -E "ms/step|spec/plain" | sed "s/^/fused $v /"
    done
    for v in 0 1; do
      DFLASH_FUSED_NORM=$v timeout 60 $S --slots 8 --batch-invariant --out $OUT/fn_inv_$v.jsonl 2>&1 \
        | tee $OUT/fn_inv_$v.log | grep -E "ms/step|spec/plain" | sed "s/^/invariant fused $v /"
    done ;;
  q8tests)  # session 19: the Q8_0 GPU tests with 128-byte swizzled rows (the default since then; cut after 4 passed),
  # and prefix caching's cached == uncached bits in the invariant mode (passed interpreted on the CPU only)
    timeout 280 python3 -m pytest -q -m gpu tests/test_q8_0_matmul_mgpu.py tests/test_batch_invariance.py \
      -k "q8 or cached_prefix" \
      -p no:cacheprovider 2>&1 | tee $OUT/q8tests.log | tail -4 ;;
  q8wide)  # issue 8, session 19: tiles for the 128-byte rows (the picker's were tuned on 32-byte ones) at the 8B's
  # fused shapes (qkv 6144, gate+up 24576, o 4096, down) and M = 1, 8, 128; then the 8B Q8_0 step, 128 vs 32
    shapes=$(for s in 4096:6144 4096:24576 4096:4096 12288:4096; do for m in 1 8 128; do echo -n "$s:$m,"; done; done)
    timeout 330 python3 bench/weight_matmul.py --models "" --sweep ${shapes%,} --budget-s 320 \
      --configs-mgpu-q8 64x2x8x4w,64x4x8x4w,64x8x4x4w,128x2x8x4w,128x4x4x4w,128x4x8x4w,64x4x4x4 \
      --out $OUT/q8wide.jsonl 2>&1 | tee $OUT/q8wide.log | grep sweep | sed -E 's/Q8MgpuConfig\([^)]*\)//'
    for sw in 128 32; do
      DFLASH_Q8_SWIZZLE=$sw timeout 120 python3 bench/decode_step.py --models qwen3-8b --weights q8_0 --slots 1,8 \
        --extra-slots "" --iters 20 --out $OUT/q8step_sw$sw.jsonl 2>&1 | grep -E " (full|fast) " | sed "s/^/sw$sw /"
    done ;;
  q8prof)  # issue 8 (session 20: 8B Q8_0 step B1 4.19 ms = 239 tok/s, target 350 = 2.86 ms): where the step's GPU time
  # goes (products, attention, norms, LM head) at 1 and 8 slots
    timeout 200 python3 bench/decode_step.py --models qwen3-8b --weights q8_0 --slots 1,8 --extra-slots "" \
      --iters 10 --profile 1:fast,8:fast --out $OUT/q8prof.jsonl 2>&1 | grep -E " (fast) |profile|  ms  x" ;;
  q8decode)  # issue 8 (session 20): the 8B Q8_0 step's decode products at splits of 1024 against the default (BN 64,
  # splits of 1536), and with the fused add + RMSNorm kernel, one process each. Session 21 also ran BN 128
  # ($DFLASH_Q8_DECODE_BN, removed: 4.294 / 5.299 ms against 4.104 / 5.160)
    for v in default sk1024 fusednorm; do
      e="X=0"; [ $v = sk1024 ] && e="DFLASH_Q8_DECODE_SPLIT_K=1024"; [ $v = fusednorm ] && e="DFLASH_FUSED_NORM=1"
      env $e timeout 120 python3 bench/decode_step.py --models qwen3-8b --weights q8_0 --slots 1,8 --extra-slots "" \
        --iters 20 --out $OUT/q8decode_$v.jsonl 2>&1 | grep -E " fast " | sed "s/^/$v /"
    done ;;
  gpu22)  # first in session 23 (~300 s): GPU tests session 22 did not run after its changes: the attention kernel
  # with one-block decode splits, the GPU engine tests with the q/k/v kernel
    timeout 280 python3 -m pytest -q -m gpu tests/test_ragged_paged_attention.py tests/test_gpu_engine.py \
      tests/test_qk_rope_write.py 2>&1 | tee $OUT/gpu22_tests.log | tail -4 ;;
  q8pad23)  # session 23 (~250 s): Q8_0 products without XLA's pad of x to 8 rows ($DFLASH_Q8_UNPADDED, off until
  # this passes; ~0.2 ms of the 8B one-slot step): GPU tests with it, then the 8B Q8_0 steps without / with it
    DFLASH_Q8_UNPADDED=1 timeout 120 python3 -m pytest -q -m gpu tests/test_q8_0_matmul_mgpu.py 2>&1 \
      | tee $OUT/q8pad23_tests.log | tail -2
    for v in 0 1; do
      DFLASH_Q8_UNPADDED=$v timeout 100 python3 bench/decode_step.py --models qwen3-8b --weights q8_0 --slots 1,2,8 \
        --extra-slots "" --iters 20 --greedy --out $OUT/q8pad23_$v.jsonl 2>&1 | grep -E " fast" | grep -v engine \
        | grep "ms/step" | sed "s/^/unpadded=$v /"
    done ;;
  drafter23)  # session 23 (~300 s): the drafter's in-block keys as one more split of the attention kernel
  # ($DFLASH_DRAFTER_BLOCK_IN_KERNEL, off until this passes): GPU tests (the engine's with the flag on too: its
  # DFlash cases also cover the drafter's serving layout, new and not yet run on a GPU), then the 8B spec steps
  # without / with it
    DFLASH_DRAFTER_BLOCK_IN_KERNEL=1 timeout 200 python3 -m pytest -q -m gpu tests/test_ragged_paged_attention.py \
      tests/test_gpu_engine.py -k "drafter or engine" 2>&1 \
      | tee $OUT/drafter23_tests.log | tail -2
    for v in 0 1; do
      DFLASH_DRAFTER_BLOCK_IN_KERNEL=$v timeout 100 python3 bench/spec_step.py --target qwen3-8b --slots 8,1 \
        --steps plain,spec --iters 20 --out $OUT/drafter23_$v.jsonl 2>&1 | grep -E " spec  |spec/plain" \
        | sed "s/^/block_in_kernel=$v /"
    done ;;
  prof24)  # session 24 (~150 s): where the 8-slot bf16 spec step's time goes now (drafter serving layout, in-kernel
  # block keys, wide-step compiler options): profiles of the plain and spec steps, traces kept for the gaps
    timeout 250 python3 bench/spec_step.py --target qwen3-8b --slots 8 --steps plain,spec --iters 20 \
      --profile 8:plain,8:spec --profile-top 200 --out $OUT/prof24.jsonl 2>&1 | tee $OUT/prof24.log \
      | grep -E "ms/step|spec/plain|busy"
    for d in /tmp/spec_step_profile_8_*; do
      f=$(find $d -name "*.trace.json.gz" | head -1); [ -n "$f" ] && cp $f $OUT/$(basename $d).trace.json.gz
    done; ls -la $OUT ;;
  s24a)  # session 24 (~250 s): the drafter's q/k/v as one product (XLA's dot merger concatenated the weights every
  # step: 5 x 26.5 us) and q/k rope + KV write with 8 heads a program (4.9 us a call at 128 rows): GPU tests, then
  # the 8B spec steps with one head a program ($DFLASH_QK_HEADS=1, the old kernel's grid) and eight
    timeout 200 python3 -m pytest -q -m gpu tests/test_qk_rope_write.py tests/test_gpu_engine.py 2>&1 \
      | tee $OUT/s24a_tests.log | tail -2
    for v in 1 8; do
      DFLASH_QK_HEADS=$v timeout 100 python3 bench/spec_step.py --target qwen3-8b --slots 8,1 \
        --steps plain,spec --iters 20 --out $OUT/s24a_$v.jsonl 2>&1 | grep -E "ms/step|spec/plain" \
        | sed "s/^/qk_heads=$v /"
    done ;;
  s24b)  # session 24 (~260 s): issue 4's table with today's defaults (the drafter's fused q/k/v, in-kernel block keys,
  # 8-head q/k rope programs), then the 8B Q8_0 steps (issue 8) with a trace of the one-slot greedy step
    timeout 200 python3 bench/spec_step.py --target qwen3-8b --slots 1,2,4,8,16 --steps plain,spec --iters 15 \
      --out $OUT/s24b_spec.jsonl 2>&1 | grep -E "spec/plain|summary| B= *[0-9]+ [|]"
    timeout 150 python3 bench/decode_step.py --models qwen3-8b --weights q8_0 --slots 1,8 --extra-slots "" \
      --iters 20 --greedy --profile 1:fast_greedy --profile-dir /tmp/q8prof --out $OUT/s24b_q8.jsonl 2>&1 \
      | grep -E " fast" | grep -v engine | grep -E "ms/step|profile"
    f=$(find /tmp/q8prof -name "*.trace.json.gz" | head -1); [ -n "$f" ] && cp $f $OUT/q8_b1.trace.json.gz ;;
  s24c)  # session 24 (~380 s): the invariant mode's DFlash == plain cases on the GPU after today's drafter and q/k
  # kernel changes, then where the one-slot Q8_0 step's time goes with x unpadded ($DFLASH_Q8_UNPADDED: no gain in
  # step time, session 24; are the pads gone from the trace?)
    timeout 280 python3 -m pytest -q -x -m gpu tests/test_batch_invariance.py \
      -k "dflash_equals_plain and (gpu-8 or gpu-16-injected or gpu-1-random or mgpu)" 2>&1 \
      | tee $OUT/s24c_tests.log | tail -2
    DFLASH_Q8_UNPADDED=1 timeout 100 python3 bench/decode_step.py --models qwen3-8b --weights q8_0 --slots 1 \
      --extra-slots "" --iters 20 --greedy --profile 1:fast_greedy --profile-dir /tmp/q8prof_u \
      --out $OUT/s24c_q8u.jsonl 2>&1 | grep -E " fast" | grep -v engine | grep -E "ms/step|profile"
    f=$(find /tmp/q8prof_u -name "*.trace.json.gz" | head -1); [ -n "$f" ] && cp $f $OUT/q8u_b1.trace.json.gz ;;
  s26a)  # issue 8 (written in session 25): the layer shapes' products by GPU busy time (`--profile`, new; alone on the
  # wall clock the small Q8_0 products took 19-38 us where the step's profile shows 7.9-10.1), both formats, the
  # Qwen3-8B and Qwen3.6-27B shapes at M = 1..128 (the issue's >= 80 % of copy table)
    timeout 500 python3 bench/weight_matmul.py --models qwen3-8b,qwen3.6-27b --ms 1,8,16,64,128 --profile \
      --variants xla_bf16,mgpu_bf16,mgpu_q8_0,xla_q8_0 --budget-s 480 --out $OUT/wm_prof.jsonl 2>&1 \
      | tee $OUT/wm_prof.log | grep -E "LAYER|copy" ;;
  s26b)  # session 25's GPU tests left: test_draft_fp8's two fixed cases, the invariant-mode DFlash == plain cases
  # with the fp8 head (the engine default since session 25), the 16-slot and mgpu cases not run since session 23
    timeout 120 python3 -m pytest -q tests/test_draft_fp8.py 2>&1 | tail -1
    timeout 400 python3 -m pytest -q -m gpu tests/test_batch_invariance.py -k dflash_equals_plain 2>&1 \
      | tee $OUT/s26b.log | tail -2 ;;
  s26c)  # issue 8 (written in session 25): the Q8_0 8-slot spec step (10.51 ms against a 3.94 ms plain step, s25c)
  # with the drafter head's fp8 copy (the default since session 25; was the Q8_0 head at 120 rows) and without
    for f in auto off; do
      timeout 100 python3 bench/spec_step.py --target qwen3-8b --weights q8_0 --slots 8,1 --steps plain,spec \
        --iters 20 --draft-fp8 $f --out $OUT/s26c_$f.jsonl 2>&1 | grep -E "spec/plain" | sed "s/^/q8_0 draft_fp8=$f /"
    done ;;
  s26d)  # issue 8 (written in session 25): the Q8_0 product at 128 verify rows, where DFlash on Q8_0 weights loses
  # (8-slot spec step 10.5 ms against 7.2 with bf16 weights): XLA bf16 and the two Mosaic Q8_0 variants per 8B layer
  # shape, then tiles / splits of both variants, all by GPU busy time
    timeout 420 python3 bench/weight_matmul.py --profile --plan "qwen3-8b:128:xla_bf16,mgpu_q8_0,mgpu_q8_0p" \
      --sweep 4096:6144:128,4096:4096:128,4096:24576:128,12288:4096:128 \
      --configs-mgpu-q8 64x1p,64x2p,64x4p,128x1p,128x2p,128x4p,64x1,64x2,64x4 --budget-s 400 \
      --out $OUT/q8_m128.jsonl 2>&1 | tee $OUT/q8_m128.log | grep -E "LAYER|sweep|copy" ;;
  s25g)  # issue 4 (session 25): the engine's new default, an fp8 copy of the drafter head on fp8 GPUs
  # (`--draft-fp8 auto`): its tests and the GPU engine tests, then the table with auto (head) and off
    timeout 150 python3 -m pytest -q tests/test_draft_fp8.py 2>&1 | tail -1
    timeout 150 python3 -m pytest -q -m gpu tests/test_gpu_engine.py 2>&1 | tail -1
    for f in auto off; do
      timeout 90 python3 bench/spec_step.py --target qwen3-8b --slots 1,2,4,8,16 --steps plain,spec --iters 15 \
        --draft-fp8 $f --out $OUT/s25g_$f.jsonl 2>&1 | grep -E "summary| B= *[0-9]+ [|]" | sed "s/^/draft_fp8=$f /"
    done ;;
  s25f)  # issue 4 (session 25): the drafter's products in fp8 (`--draft-fp8 head|all`, new): its tests on the GPU, the
  # 8B spec steps at 8 and 1 slots with off / head / all, a profile of the 8-slot fp8 step (cuBLASLt's fp8 kernels?),
  # then the plain step without XLA's autotuner (the wide spec steps' new option, s25e)
    timeout 150 python3 -m pytest -q tests/test_draft_fp8.py 2>&1 | tail -2
    for f in off head all; do
      timeout 100 python3 bench/spec_step.py --target qwen3-8b --slots 8,1 --steps plain,spec --iters 20 \
        --draft-fp8 $f --out $OUT/s25f_$f.jsonl 2>&1 | grep -E "spec/plain" | sed "s/^/draft_fp8=$f /"
    done
    timeout 60 python3 bench/spec_step.py --target qwen3-8b --slots 8 --steps spec --iters 10 --draft-fp8 all \
      --profile 8:spec --profile-top 300 --out $OUT/s25f_prof.jsonl 2>&1 | grep -E "profile"
    for o in "" "xla_gpu_autotune_level=0"; do
      DFLASH_XLA_STEP_OPTIONS="$o" timeout 60 python3 bench/spec_step.py --target qwen3-8b --slots 8,1 --steps plain \
        --iters 20 --out $OUT/s25f_plain_${#o}.jsonl 2>&1 | grep -E "ms/step" | sed "s/^/[$o] /"
    done ;;
  s25e)  # issue 4 (session 25, s25a: with autotune level 0 and Triton off on every step the 8-slot spec step ran 1 %
  # faster, 1122-1129 against 1112-1114 tok/s at tau 1, while the plain step lost 4.5 %): the option on the wide spec
  # steps alone ($DFLASH_WIDE_SPEC_OPTIONS), 4 / 8 / 16 slots, two rounds; a profile of each 8-slot spec step; then
  # two key blocks per decode split (s25d: 8-slot decode attention 10.3 against 12.7 us a call by GPU busy time)
    for round in 1 2; do
      for o in "" "xla_gpu_enable_triton_gemm=false,xla_gpu_autotune_level=0"; do
        DFLASH_WIDE_SPEC_OPTIONS="$o" timeout 110 python3 bench/spec_step.py --target qwen3-8b --slots 8,4,16 \
          --steps plain,spec --iters 20 --out $OUT/s25e_$round.jsonl 2>&1 | grep -E "spec/plain" | sed "s/^/[$o] /"
      done
    done
    for o in "" "xla_gpu_enable_triton_gemm=false,xla_gpu_autotune_level=0"; do
      DFLASH_WIDE_SPEC_OPTIONS="$o" timeout 60 python3 bench/spec_step.py --target qwen3-8b --slots 8 --steps spec \
        --iters 10 --profile 8:spec --profile-top 300 --out $OUT/s25e_prof_${#o}.jsonl 2>&1 | grep -E "profile" \
        | sed "s/^/[$o] /"
    done
    for sb in 1 2; do
      DFLASH_RPA_SPLIT_BLOCKS=$sb timeout 60 python3 bench/spec_step.py --target qwen3-8b --slots 8,1 --steps plain \
        --iters 20 --out $OUT/s25e_sb$sb.jsonl 2>&1 | grep -E "ms/step" | sed "s/^/split_blocks=$sb /"
    done ;;
  s25a)  # issue 4's margin (session 24: 8-slot spec/plain 1.47 / 1.50 / 1.51 in three calls, spec 7.10-7.15 ms, plain
  # 4.71-4.82): the wide spec step's products under other XLA options (without Triton products cuBLAS picks a split-K
  # 128x64 tile + a 3.7 us reduce for down_proj, 35.4 us, where XLA's autotuner took nvjet 256x64, 31.5 us), three
  # rounds so that the plain step's spread shows
    for round in 1 2 3; do
      for o in "" "xla_gpu_enable_triton_gemm=false,xla_gpu_enable_cublaslt=true" \
               "xla_gpu_enable_triton_gemm=false,xla_gpu_autotune_level=0"; do
        DFLASH_XLA_STEP_OPTIONS="$o" timeout 90 python3 bench/spec_step.py --target qwen3-8b --slots 8 \
          --steps plain,spec --iters 20 --out $OUT/s25a.jsonl 2>&1 | grep -E "spec/plain" | sed "s/^/[$o] /"
      done
    done ;;
  s25c)  # issue 4 (session 24): a draft vocabulary (`--draft-vocab`, the drafter's own head over the first N token ids;
  # SmolLM2 held-out code tau 3.34 -> 3.22 at a third of its vocabulary, CPU): the 8B spec steps with the whole
  # head (318 us of the 8-slot step re-read by the drafter), 32768 and 16384 of 151936 ids; bf16 and Q8_0 at 8 slots
    timeout 150 python3 -m pytest -q tests/test_dflash.py -k "draft_vocab or draft_head" 2>&1 | tail -2
    for n in 0 32768 16384; do
      timeout 100 python3 bench/spec_step.py --target qwen3-8b --slots 8,1 --steps plain,spec --iters 20 \
        --draft-vocab $n --out $OUT/s25c_$n.jsonl 2>&1 | grep -E "spec/plain" | sed "s/^/draft_vocab=$n /"
    done
    for n in 0 32768; do
      timeout 100 python3 bench/spec_step.py --target qwen3-8b --weights q8_0 --slots 8 --steps plain,spec \
        --iters 20 --draft-vocab $n --out $OUT/s25c_q8_$n.jsonl 2>&1 | grep -E "spec/plain" \
        | sed "s/^/q8_0 draft_vocab=$n /"
    done ;;
  s25d)  # issues 4 and 8 (~200 s): attention tiles at 512 keys timed by the GPU's busy time (`--profile`, new; the
  # wall clock could not rank them, session 24): in a step the 8-slot verify takes 14.3 us a call (36 a step), the
  # one-slot decode 4.8
    timeout 280 python3 bench/attention.py --slots 8,1 --ctx 512 --qlens 1,16 --layers 36 --no-ref --iters 5 \
      --profile --tune "0,0,0,0;64,4,3,0;32,4,2,0;32,2,2,0;128,4,2,0;64,4,2,4;64,4,2,2;16,4,2,0;16,2,2,0" \
      --out $OUT/attn25.jsonl 2>&1 | grep -v Warn ;;
  s25b)  # issue 8 (one-slot Q8_0 step 3.54 ms, target 2.857): at M = 1 the small products stream slowest (session 24
  # trace: qkv 10.1 us = 2.65 TB/s, o 7.85 us = 2.27, down 17.4 = 3.07, gate+up 31.5 = 3.40, LM head 4.06): tiles
  # and K splits for the 8B's four layer shapes at M = 1 and 8
    shapes=$(for s in 4096:6144 4096:4096 12288:4096 4096:24576; do for m in 1 8; do echo -n "$s:$m,"; done; done)
    timeout 400 python3 bench/weight_matmul.py --models "" --sweep ${shapes%,} \
      --configs-mgpu-q8 64x1,64x2,64x4,64x8,64x16,128x1,128x2,128x4 --budget-s 380 \
      --out $OUT/q8_small.jsonl 2>&1 | tee $OUT/q8_small.log | grep sweep ;;
  attn23)  # session 23 (~200 s): attention tiles at 512 keys as a step runs them (36 calls in one jitted function):
  # the 8-slot step's attention takes 10.9 us a call for decode rows, 15.2 for 128 verify rows, ~4 us of K/V bytes
    timeout 280 python3 bench/attention.py --slots 8,1 --ctx 512 --qlens 1,16 --layers 36 --no-ref --iters 5 \
      --tune "0,0,0,0;64,4,3,0;64,8,2,0;32,4,2,0;32,4,3,0;32,2,2,0;128,4,2,0;128,8,2,0;64,4,2,4;64,4,2,2;16,4,2,0" \
      --mgpu "0,0,0,g;0,0,0,s" --out $OUT/attn23.jsonl 2>&1 | grep -v Warn ;;
  s23)  # session 22's follow-ups (~330 s): issue 3's bf16 table at 1, 2, 4, 8, 16 slots with today's kernels (llama.cpp
  # 234 / 426 / 729 / 1004 / 1788; 2 and 4 slots last measured in session 1), the Q8_0 steps with one-block decode
  # splits, and verify tiles with one block per split ($DFLASH_RPA_SPLIT_BLOCKS=1) against four
    timeout 120 python3 bench/decode_step.py --models qwen3-8b --slots 1,2,4,8,16 --extra-slots "" --iters 20 \
      --greedy --out $OUT/bf16_slots.jsonl 2>&1 | grep -E " fast" | grep -v engine | grep "ms/step"
    timeout 90 python3 bench/decode_step.py --models qwen3-8b --weights q8_0 --slots 1,8 --extra-slots "" --iters 20 \
      --greedy --out $OUT/q8_slots.jsonl 2>&1 | grep -E " fast" | grep -v engine | grep "ms/step" | sed "s/^/q8_0 /"
    for sb in 1 4; do
      DFLASH_RPA_SPLIT_BLOCKS=$sb timeout 60 python3 bench/spec_step.py --target qwen3-8b --slots 8 --steps plain,spec \
        --iters 20 --out $OUT/spec_sb$sb.jsonl 2>&1 | grep -E "ms/step|spec/plain" | sed "s/^/split_blocks=$sb /"
    done ;;
  qk)  # session 22: the q/k norm + RoPE + KV-write kernel (pallas_kernels/qk_rope_write.py): its GPU tests and the
  # engine's bf16 invariance tests, then the 8B steps with it off and on, Q8_0 and bf16, one process each
    timeout 200 python3 -m pytest -q -m gpu tests/test_qk_rope_write.py tests/test_batch_invariance.py \
      -k "qk or dflash_equals_plain" 2>&1 | tee $OUT/qk_tests.log | tail -3
    for w in q8_0 bf16; do for f in 0 1; do
      DFLASH_FUSED_QK=$f timeout 110 python3 bench/decode_step.py --models qwen3-8b --weights $w --slots 1,8 \
        --extra-slots "" --iters 20 --greedy --out $OUT/qk_${w}_$f.jsonl 2>&1 | grep -E " fast" | sed "s/^/$w qk=$f /"
    done; done ;;
  q8engine)  # issue 8 (session 21): an 8-slot invariant engine takes pre-scaled Q8_0 products for its 8 x 16 verify
  # rows (1.42x faster verify, ~1.2x slower plain steps: 189 vs 254 tok/s at one client). With block 8 (64 verify
  # rows) it would keep the exact ones: both variants at block 8 and 16, plain and spec, 8 and 1 slots (~400 s)
    for blk in 16 8; do for pre in 1 0; do
      DFLASH_Q8_PRESCALE=$pre timeout 95 python3 bench/spec_step.py --target qwen3-8b --weights q8_0 --slots 8,1 \
        --steps plain,spec --iters 10 --block $blk --batch-invariant --out $OUT/q8engine_b${blk}_p$pre.jsonl 2>&1 \
        | grep -E "ms/step|spec/plain" | sed "s/^/block $blk prescale $pre /"
    done; done ;;
  *) echo "unknown call $1"; exit 2 ;;
esac
