"""llama.cpp (xllamacpp, CPU) as the reference oracle: greedy continuations with per-token logprobs."""
from __future__ import annotations

from dataclasses import dataclass

try:
    import xllamacpp as xlc
except ImportError:  # the GPU machine has no llama.cpp: its gpu-marked tests never build a LlamaCpp
    xlc = None

GGML_TYPE_F32 = 0


@dataclass
class RefPiece:
    """llama.cpp reports one logprob entry per complete UTF-8 piece: several tokens may share one entry."""
    token_id: int  # the last token of the piece
    text_bytes: bytes
    logprob: float
    margin: float  # logprob gap between its top-1 and top-2 choice


class LlamaCpp:
    def __init__(self, model_path: str, n_ctx: int = 2048, f32_cache: bool = True, **params):
        if xlc is None:
            raise ImportError("the llama.cpp reference needs the xllamacpp package (pip install -e '.[test]')")
        p = xlc.CommonParams()
        p.model.path = str(model_path)
        p.n_ctx = n_ctx
        p.cpuparams.n_threads = 2
        p.cpuparams_batch.n_threads = 2
        p.sampling.temp = 0.0
        p.sampling.top_k = 1
        if f32_cache:  # removes llama.cpp's f16 KV rounding so f32 weights compare at ~1e-4
            p.cache_type_k = GGML_TYPE_F32
            p.cache_type_v = GGML_TYPE_F32
        for key, value in params.items():
            setattr(p, key, value)
        self.server = xlc.Server(p)

    def greedy(self, prompt_ids: list[int], max_tokens: int) -> tuple[str, list[RefPiece]]:
        r = self.server.handle_completions({"prompt": list(prompt_ids), "max_tokens": max_tokens, "temperature": 0,
                                            "n_probs": 2, "cache_prompt": False})
        choice = r["choices"][0]
        pieces = []
        for c in choice["logprobs"]["content"]:
            top = c["top_logprobs"]
            pieces.append(RefPiece(c["id"], bytes(c["bytes"]), c["logprob"],
                                   top[0]["logprob"] - top[1]["logprob"] if len(top) > 1 else float("inf")))
        return choice["text"], pieces


def align(our_ids: list[int], our_logprobs: list[float], token_bytes, pieces: list[RefPiece]):
    """Walk our tokens piece by piece. Returns (number of pieces that agree, |logprob diffs| of single-token pieces,
    the first piece that disagrees or None)."""
    diffs, i = [], 0
    for n, piece in enumerate(pieces):
        acc, start = b"", i
        if not piece.text_bytes:  # an end-of-generation token: llama.cpp reports it with no text
            i += 1
            acc = piece.text_bytes
        while i < len(our_ids) and len(acc) < len(piece.text_bytes):
            acc += token_bytes(our_ids[i])
            i += 1
        if acc != piece.text_bytes or i > len(our_ids) or our_ids[i - 1] != piece.token_id:
            return n, diffs, piece
        if i - start == 1:
            diffs.append(abs(our_logprobs[start] - piece.logprob))
    return len(pieces), diffs, None
