"""GPU time of jitted steps from jax.profiler traces: where a step's device time goes, kernel by kernel."""
from __future__ import annotations

import glob
import os
import shutil

import jax


def device_profile(step, n: int, workdir: str, top_n: int = 40) -> dict:
    """Trace n calls of step() with jax.profiler and summarize them (`summarize_trace`)."""
    jax.block_until_ready(step())
    shutil.rmtree(workdir, ignore_errors=True)
    with jax.profiler.trace(workdir):
        out = None
        for _ in range(n):
            out = step()
        jax.block_until_ready(out)
    return summarize_trace(workdir, n, top_n)


def gpu_busy(fn, args, iters: int, workdir: str) -> float:
    """Seconds of GPU busy time per call of fn(*args), from a profiler trace of `iters` calls: what a kernel takes
    without the launch and host overhead that the wall clock of a short call is made of."""
    prof = device_profile(lambda: fn(*args), iters, workdir, top_n=5)
    if not prof["busy_ms_per_step"]:
        raise RuntimeError("no GPU kernels in the trace (--profile needs a GPU)")
    return prof["busy_ms_per_step"] / 1e3


def summarize_trace(workdir: str, n: int, top_n: int = 40) -> dict:
    """Sum the GPU kernel events of a jax.profiler trace of n steps: device busy ms per step (union of kernel
    intervals on all GPU lines), span per step, and the `top_n` kernels taking most time."""
    from jax.profiler import ProfileData

    files = glob.glob(os.path.join(workdir, "**", "*.xplane.pb"), recursive=True)
    pd = ProfileData.from_file(files[0])
    by_name, lines, intervals = {}, {}, []
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name in ("XLA Modules", "XLA Ops", "Steps", "XLA TraceMe", "Source code"):
                lines[f"{plane.name}:{line.name}"] = sum(e.duration_ns for e in line.events) / 1e6 / n
                continue
            tot = 0.0
            for e in line.events:
                tot += e.duration_ns
                intervals.append((e.start_ns, e.end_ns))
                key = e.name[:90]
                c = by_name.setdefault(key, [0.0, 0])
                c[0] += e.duration_ns
                c[1] += 1
            lines[f"{plane.name}:{line.name}"] = tot / 1e6 / n
    intervals.sort()
    busy, cur_s, cur_e = 0.0, None, None
    for a, b in intervals:
        if cur_e is None or a > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    if cur_e is not None:
        busy += cur_e - cur_s
    span = (intervals[-1][1] - intervals[0][0]) if intervals else 0.0
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top_n]
    return {"busy_ms_per_step": busy / 1e6 / n, "span_ms_per_step": span / 1e6 / n, "kernels_per_step":
            sum(c for _, c in by_name.values()) / n, "lines_ms_per_step": lines,
            "top": [(k, v[0] / 1e6 / n, v[1] / n) for k, v in top]}
