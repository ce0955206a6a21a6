"""A model's identical layers traced and lowered once per step: each layer's forward is a jitted call on its split
state, so a 64-layer Qwen3.6-27B decode step traces two layer bodies (recurrent, attention) instead of 64. The
calls are nested `jit`s, which XLA inlines: the compiled step is the same program.

A fresh jitted wrapper per step trace: what the body reads at trace time (the batch-invariant mode, the Q8_0
variant, the kernels chosen by environment) belongs to that trace, so no jit cache outlives it. Called outside a trace
(eager tests, tools) the layers run as plain calls: a fresh jit per call would compile every time."""
from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx


def per_trace(fn: Callable, static_argnames: tuple[str, ...] = ()) -> Callable:
    """fn(module, *args, **static) -> the same as a jitted call: one trace per (structure, shapes, statics)."""
    jitted = jax.jit(lambda graphdef, state, *args, **kw: fn(nnx.merge(graphdef, state), *args, **kw),
                     static_argnums=0, static_argnames=static_argnames)

    def call(module, *args, **kw):
        if not any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(args)):
            return fn(module, *args, **kw)
        graphdef, state = nnx.split(module)
        return jitted(graphdef, state, *args, **kw)
    return call
