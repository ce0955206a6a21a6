"""bf16 exactness experiment: DFlash vs plain greedy outputs of the default model and its shipped drafter, (A) bf16
everywhere, (B) bf16 weights with f32 activations and f32 matmul outputs (matmul inputs rounded to bf16), the
reference (non-Pallas) path. A measurement toward making bf16 DFlash equal plain decoding; not a serving mode.

    python bench/bf16_exactness.py bf16|mixed N_PROMPTS MAX_TOKENS [MODEL.gguf]
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import pallas_kernels.weight_matmul as wm  # noqa: E402
from converters.checkpoint import load_drafter, load_model  # noqa: E402
from dflash_jax.train import data  # noqa: E402
from dflash_jax.train.evaluate import evaluate  # noqa: E402

mode = sys.argv[1]
n, toks = int(sys.argv[2]), int(sys.argv[3])
lm = load_model(sys.argv[4] if len(sys.argv) > 4 else "SmolLM2-135M-Instruct.Q4_1.gguf", jnp.bfloat16)
d = load_drafter("dflash_jax/assets/smollm2-135m-dflash.gguf", lm.config, jnp.bfloat16)
if mode == "mixed":
    def mixed(x, weight, out_dtype=None):  # the dispatcher's CPU path: bf16 inputs, f32 accumulation and output
        return jnp.einsum("...i,oi->...o", x.astype(weight.dtype), weight, preferred_element_type=jnp.float32)
    wm.matmul_reference = mixed
    lm.model.embed_tokens = nnx.Param(lm.model.embed_tokens[...].astype(jnp.float32))
prompts = data.humaneval_prompts(None, "heldout")[:n]
rep = evaluate(lm, d, {"code": prompts}, (1,), toks, "bfloat16", prefill_chunk=64, progress=False)
e = rep["code"][1]
print(mode, json.dumps({"tau": e["dflash"]["tau"], "identical": e["identical_outputs"], "first_divergence": e["first_divergence"],
                        "tok_s": [e["dflash"]["tokens_per_s"], e["plain"]["tokens_per_s"]]}))
