"""Load generator: N concurrent streaming chat requests against an OpenAI-compatible server, as markdown table rows."""
from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass, field

import openai

# A fixed mix of prompt lengths (short chat turns to a few hundred tokens), cycled through in order, so runs are
# comparable between servers and between commits.
_PARAGRAPH = ("The history of computing spans mechanical calculators, vacuum tubes, transistors and integrated "
              "circuits, each step making machines smaller, faster and cheaper while software grew from hand-wired "
              "programs to operating systems, compilers, networks and the web. ")
PROMPTS = [
    "Hi! How are you today?",
    "Write a short poem about the sea.",
    "Explain what a hash table is and when to use one.",
    "Summarize the following text in three bullet points:\n" + _PARAGRAPH * 3,
    "Give me a recipe for pancakes with step-by-step instructions.",
    "Read this and list the key technologies it mentions:\n" + _PARAGRAPH * 8,
    "What are the differences between TCP and UDP?",
    "Continue the story: " + _PARAGRAPH * 5,
]


SYSTEM = "You are a helpful assistant. Answer briefly. Background you may need:\n"


@dataclass
class Result:
    ttft: float | None = None  # seconds from sending to the first content token
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive content chunks
    tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens, where the server reports it
    error: str | None = None
    text: str = ""
    turn: int = 0  # 0: a conversation's first request


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def first_messages(prompt: str, args) -> list[dict]:
    messages = [{"role": "user", "content": prompt}]
    if args.system_paragraphs:  # one long system prompt shared by every request (prefix caching's case)
        messages.insert(0, {"role": "system", "content": SYSTEM + _PARAGRAPH * args.system_paragraphs})
    return messages


async def one_request(client: openai.AsyncOpenAI, model: str, messages: list[dict], args) -> Result:
    res = Result()
    extra = {"ignore_eos": True} if args.ignore_eos else {}
    if not args.cache_prompt:
        extra["cache_prompt"] = False
    start = last = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=args.max_tokens,
            temperature=args.temperature, stream=True, stream_options={"include_usage": True}, extra_body=extra)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                res.tokens, res.prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
                details = chunk.usage.prompt_tokens_details
                res.cached_tokens = (details.cached_tokens or 0) if details is not None else 0
            if not chunk.choices or not chunk.choices[0].delta.content:
                continue
            res.text += chunk.choices[0].delta.content
            if res.ttft is None:
                res.ttft = now - start
            else:
                res.gaps.append(now - last)
            last = now
    except openai.OpenAIError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_level(client: openai.AsyncOpenAI, model: str, concurrency: int, args) -> dict:
    todo = asyncio.Queue()
    for i in range(args.requests):
        # --unique-prompts: no two user turns alike, so a prefix cache can serve only the shared system prompt
        todo.put_nowait((i, (f"[{time.time_ns()}-{i}] " if args.unique_prompts else "") + PROMPTS[i % len(PROMPTS)]))
    results: list[Result] = []

    async def worker():
        while not todo.empty():
            i, prompt = todo.get_nowait()
            messages = first_messages(prompt, args)
            for turn in range(args.turns):  # --turns: each next turn sends the whole chat so far
                res = await one_request(client, model, messages, args)
                res.turn = turn
                results.append(res)
                messages = messages + [{"role": "assistant", "content": res.text},
                                       {"role": "user", "content": PROMPTS[(i + turn + 1) % len(PROMPTS)]}]

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tokens = sum(r.tokens for r in ok)
    errors = [r.error for r in results if r.error]
    if errors:
        print(f"[concurrency {concurrency}] {len(errors)} errors, first: {errors[0]}", file=sys.stderr)
    later = [r for r in ok if r.turn > 0]
    return {"concurrency": concurrency, "requests": len(ok), "errors": len(errors), "wall_s": wall,
            "later_turns": len(later),
            "later_ttft_p50": percentile([r.ttft for r in later if r.ttft is not None], 50) * 1e3,
            "later_prompt_tokens": sum(r.prompt_tokens for r in later),
            "later_cached_tokens": sum(r.cached_tokens for r in later),
            "prompt_tokens": sum(r.prompt_tokens for r in ok), "cached_tokens": sum(r.cached_tokens for r in ok),
            "tok_s": tokens / wall if wall > 0 else 0.0, "tokens": tokens,
            "ttft": [percentile(ttfts, q) * 1e3 for q in (50, 90, 99)],
            "itl": [percentile(gaps, q) * 1e3 for q in (50, 90, 99)]}


HEADER = ("| concurrency | requests | gen tokens | wall s | gen tok/s | TTFT p50 / p90 / p99 ms | "
          "ITL p50 / p90 / p99 ms |\n|---|---|---|---|---|---|---|")


def row(r: dict) -> str:
    ttft = " / ".join(f"{v:.0f}" for v in r["ttft"])
    itl = " / ".join(f"{v:.1f}" for v in r["itl"])
    errors = f" ({r['errors']} failed)" if r["errors"] else ""
    return (f"| {r['concurrency']} | {r['requests']}{errors} | {r['tokens']} | {r['wall_s']:.1f} | "
            f"{r['tok_s']:.1f} | {ttft} | {itl} |")


async def main_async(args) -> int:
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=args.timeout)
    model = args.model or (await client.models.list()).data[0].id
    if args.warmup:  # the first request after start may pay one-off costs (connection setup, lazy init)
        await one_request(client, model, first_messages(PROMPTS[0], args), args)
    print(f"model `{model}`, {args.requests} requests per level, max_tokens {args.max_tokens}, "
          f"ignore_eos {args.ignore_eos}\n")
    print(HEADER, flush=True)
    failed = False
    for c in args.concurrency:
        r = await run_level(client, model, c, args)
        failed |= r["errors"] > 0
        print(row(r), flush=True)
        if args.system_paragraphs or args.turns > 1:
            print(f"  (prompt tokens {r['prompt_tokens']}, of them from the prefix cache {r['cached_tokens']})",
                  file=sys.stderr, flush=True)
        if r["later_turns"]:
            print(f"  (turns after the first: {r['later_turns']}, TTFT p50 {r['later_ttft_p50']:.0f} ms, prompt "
                  f"tokens {r['later_prompt_tokens']}, from the cache {r['later_cached_tokens']})",
                  file=sys.stderr, flush=True)
    await client.close()
    return 1 if failed else 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog="example: python bench/load.py --base-url "
                                "http://127.0.0.1:8080/v1 --concurrency 1,2,4,8,16 --requests 32 --max-tokens 128")
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", default="none")
    p.add_argument("--model", default=None, help="default: the first model /v1/models lists")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    p.add_argument("--requests", type=int, default=32, help="requests (conversations with --turns) per level")
    p.add_argument("--turns", type=int, default=1, help="requests per conversation, each with the chat so far")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (default: always generate max_tokens, so levels are comparable)")
    p.add_argument("--warmup", type=int, default=1, help="requests sent before measuring (0 to skip)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--system-paragraphs", type=int, default=0,
                   help="prepend one system prompt of this many paragraphs (~40 tokens each) to every request")
    p.add_argument("--unique-prompts", action="store_true",
                   help="start every user turn with a unique tag (nothing but the system prompt repeats)")
    p.add_argument("--no-cache-prompt", dest="cache_prompt", action="store_false",
                   help="send cache_prompt: false (the server computes every prompt in full)")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main_async(parse_args())))
