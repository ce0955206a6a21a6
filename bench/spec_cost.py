"""What a DFlash spec step costs against a plain step, per draft length and slot count, on the engine's own compiled
steps (the adaptive policy's warm-up measurement), and what that means for a drafter's measured acceptance:

    python bench/spec_cost.py -m TARGET.gguf -md DRAFTER.gguf --slots 1,8 --draft-max 15,7,3 [--acceptance 0.6,0.35,...]

For each (slots, draft length): plain and spec step ms, their ratio (the tau a spec step needs to break even), and
with --acceptance (P(accepted >= k) per block position, as `train eval` prints) the tau that length would reach and
the expected speedup tau * plain / spec.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from converters.checkpoint import load_drafter, load_model  # noqa: E402
from dflash_jax.buckets import bucket_for  # noqa: E402
from dflash_jax.engine import Engine, EngineConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-md", "--model-draft", required=True)
    ap.add_argument("--slots", default="1,8")
    ap.add_argument("--draft-max", default="15,7,3")
    ap.add_argument("--acceptance", default="", help="P(accepted >= k), k = 1.., comma-separated")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    dtype = a.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    lm = load_model(a.model, jnp.dtype(dtype))
    drafter = load_drafter(a.model_draft, lm.config, jnp.dtype(dtype))
    acc = [float(x) for x in a.acceptance.split(",") if x.strip()]
    device = jax.devices()[0].device_kind if jax.devices()[0].platform == "gpu" else platform.processor() or "cpu"
    print(f"device: {device}, dtype {dtype}")
    print("| slots | drafts per block | plain ms | spec ms | spec / plain (break-even tau) | tau at this length |"
          " expected speedup |")
    print("|---|---|---|---|---|---|---|")
    for slots in map(int, a.slots.split(",")):
        for dm in map(int, a.draft_max.split(",")):
            eng = Engine(lm, EngineConfig(num_slots=slots, ctx_size=1024 * slots, ctx_per_slot=1024, prefill_chunk=64,
                                          dtype=dtype, draft_max=dm), drafter)
            b = bucket_for(slots, eng.cfg.slot_buckets)
            eng.spec.slot_buckets = (b,)  # compile and time this bucket only
            eng.spec.measure_costs(eng, repeats=a.repeats)  # best of repeats: the first run's compile drops out
            plain, spec = eng.spec.cost_plain[b], eng.spec.cost_spec[b]
            tau = 1 + sum(acc[:dm]) if acc else None
            extra = f" {tau:.3f} | {tau * plain / spec:.2f} |" if tau else " | |"
            print(f"| {b} | {dm} | {plain * 1e3:.2f} | {spec * 1e3:.2f} | {spec / plain:.2f} |{extra}", flush=True)


if __name__ == "__main__":
    main()
