"""Live-server tests: `python -m serve` on SmolLM2 driven over HTTP with the real openai client."""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

API_KEY = "test-key"
SLOTS, CTX = 8, 4096
SLOT_CTX = CTX // SLOTS  # 512 tokens per request
STARTUP_TIMEOUT_S = 900  # a cold XLA compile cache on a 2-core CPU takes minutes
REPO = Path(__file__).resolve().parents[1]

PROMPTS = [
    "Hi!",
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
    "Explain in simple words what a computer program is, and give one short example of a program that people use "
    "every day, such as a web browser or a calculator.",
    "Count from one to ten.",
    "Tell me a fun fact about cats.",
    "Describe the weather on a sunny day in two sentences. Mention the sky, the temperature and how people feel "
    "when they go outside to enjoy it with their friends and family.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.auth = {"Authorization": f"Bearer {API_KEY}"}

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120, **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.auth, timeout=30, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        headers = {**self.auth, **kw.pop("headers", {})}
        return httpx.post(self.url + path, headers=headers, timeout=120, **kw)

    def slots(self) -> dict:
        return self.get("/slots").json()

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.slots()
            if stats["busy_slots"] == 0 and stats["queue_len"] == 0:
                return True
            time.sleep(0.1)
        return False


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "serve", "-m", str(smollm2_path), "--slots", str(SLOTS), "-c", str(CTX), "-ub", "64",
           "--port", str(port), "--api-key", API_KEY, "--alias", "smol", "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    srv = Server(proc, port, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    saw_loading = False
    while True:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"server not ready in {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-4000:]}"
        try:
            r = httpx.get(srv.url + "/health", timeout=5)
        except httpx.TransportError:
            time.sleep(0.5)
            continue
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json() == {"status": "loading"}, r.text
        saw_loading = True
        time.sleep(1)
    srv.saw_loading = saw_loading
    yield srv
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("server did not exit within 60 s of SIGTERM")
    assert code == 0, f"server exit code {code}:\n{log.read_text()[-4000:]}"


# ---- basic endpoints ------------------------------------------------------------------------------------------------

def test_health_models_slots(server):
    assert server.saw_loading, "/health never answered 503 while loading"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["smol"]
    stats = server.slots()
    assert stats["num_slots"] == SLOTS and len(stats["slots"]) == SLOTS
    assert all(s["state"] == "idle" for s in stats["slots"])
    missing = server.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["message"]


def _chat(client, prompt: str, max_tokens: int, **kw):
    return client.chat.completions.create(model="smol", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=max_tokens, temperature=0, **kw)


def _stream_chat(client, prompt: str, max_tokens: int, **kw) -> tuple[str, str, list]:
    chunks = list(_chat(client, prompt, max_tokens, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1, finish
    return text, finish[0], chunks


def test_concurrent_requests_match_sequential(server):
    client = server.client()
    jobs = [(PROMPTS[i % len(PROMPTS)] + (" Please." if i >= len(PROMPTS) else ""), 8 + (i * 7) % 33, i % 3 == 0)
            for i in range(16)]

    def run(job):
        prompt, max_tokens, stream = job
        if stream:
            text, finish, _ = _stream_chat(client, prompt, max_tokens)
            return text, finish
        r = _chat(client, prompt, max_tokens)
        return r.choices[0].message.content, r.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    assert server.wait_idle(5)
    for job, (text, finish) in zip(jobs, together):
        alone = _chat(client, job[0], job[1])  # non-streaming, so streamed runs above are checked against it too
        assert (text, finish) == (alone.choices[0].message.content, alone.choices[0].finish_reason), job
        assert finish in ("stop", "length")


def test_stream_usage_and_timings_consistent(server):
    client = server.client()
    text, finish, chunks = _stream_chat(client, PROMPTS[4], 24, logprobs=True, top_logprobs=2,
                                        stream_options={"include_usage": True})
    first, last = chunks[0], chunks[-1]
    assert first.object == "chat.completion.chunk" and first.choices[0].delta.role == "assistant"
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    token_entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    usage = last.usage
    assert usage.completion_tokens == len(token_entries) > 0  # one logprob entry per generated token
    assert all(len(e.top_logprobs) == 2 for e in token_entries)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert finish == "stop" or usage.completion_tokens == 24
    timings = last.model_extra["timings"]
    assert timings["predicted_n"] == usage.completion_tokens
    assert timings["prompt_n"] + timings["cache_n"] == usage.prompt_tokens
    assert timings["prompt_ms"] > 0 and timings["predicted_per_second"] > 0
    assert timings["draft_n"] == 0 and timings["draft_n_accepted"] == 0

    whole = _chat(client, PROMPTS[4], 24)
    assert whole.choices[0].message.content == text
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # the second run may take the prompt's pages
    assert [getattr(whole.usage, c) for c in counts] == [getattr(usage, c) for c in counts]
    assert whole.model_extra["timings"]["predicted_n"] == whole.usage.completion_tokens


def test_completions_endpoint(server):
    client = server.client()
    r = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=6, temperature=0,
                                  logprobs=2)
    choice = r.choices[0]
    assert r.object == "text_completion" and choice.finish_reason in ("stop", "length")
    assert "".join(choice.logprobs.tokens) == choice.text
    assert len(choice.logprobs.tokens) == r.usage.completion_tokens
    assert all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    streamed = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=6,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    by_ids = client.completions.create(model="smol", prompt=[504, 3458, 282], max_tokens=4, temperature=0)
    assert by_ids.usage.prompt_tokens == 3


def test_n_choices(server):
    """n > 1: each choice is a request of its own; a seeded body's choice i draws what seed + i draws alone."""
    client = server.client()
    kw = dict(model="smol", messages=[{"role": "user", "content": "Write a word."}], max_tokens=10, temperature=1.0)
    r = client.chat.completions.create(n=3, seed=5, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert texts[1] == client.chat.completions.create(seed=6, **kw).choices[0].message.content
    assert len(set(texts)) > 1
    alone = [client.chat.completions.create(seed=5 + i, **kw).usage for i in range(3)]
    singles = [u.completion_tokens for u in alone]
    assert r.usage.completion_tokens == sum(singles) and r.usage.prompt_tokens == alone[0].prompt_tokens
    chunks = list(client.chat.completions.create(n=2, seed=5, stream=True, stream_options={"include_usage": True},
                                                 **kw))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(2)]
    assert streamed == texts[:2]
    finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1]
    assert chunks[-1].usage.completion_tokens == sum(singles[:2]) and not chunks[-1].choices


def test_props(server):
    props = server.get("/props").json()
    assert props["total_slots"] == SLOTS and props["model_alias"] == "smol"
    assert props["default_generation_settings"]["n_ctx"] == CTX // SLOTS
    assert "{%" in props["chat_template"] and props["eos_token"]


def test_tokenize_detokenize(server):
    ids = server.post("/tokenize", json={"content": "Hello world"}).json()["tokens"]
    assert ids and all(isinstance(i, int) for i in ids)
    assert server.post("/detokenize", json={"tokens": ids}).json() == {"content": "Hello world"}
    pieces = server.post("/tokenize", json={"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids and "".join(p["piece"] for p in pieces) == "Hello world"
    bad = server.post("/detokenize", json={"tokens": [10 ** 9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_logit_bias(server):
    """OpenAI's logit_bias through the real client: +100 forces a token, -100 bans it (the next best boosted one
    takes its place); a biased greedy request beside another leaves the other's output unchanged."""
    client = server.client()
    prompt = [504, 3458, 282]

    def text_of(ids):
        return server.post("/detokenize", json={"tokens": ids}).json()["content"]

    forced = client.completions.create(model="smol", prompt=prompt, max_tokens=4, temperature=0,
                                       logit_bias={"28": 100, "29": 90})
    assert forced.choices[0].text == text_of([28] * 4) and forced.usage.completion_tokens == 4
    banned = client.completions.create(model="smol", prompt=prompt, max_tokens=4, temperature=0,
                                       logit_bias={"28": -100, "29": 90})
    assert banned.choices[0].text == text_of([29] * 4)
    alone = _chat(client, "Name a color.", 6, response_format={"type": "text"}).choices[0].message.content
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        crowd = pool.submit(_chat, client, "Name a color.", 6)
        pool.submit(_chat, client, "Name a color.", 6, logit_bias={"28": 100}).result()
        assert crowd.result().choices[0].message.content == alone


# ---- bad input ------------------------------------------------------------------------------------------------------

MSG = [{"role": "user", "content": "Hi"}]
BAD_REQUESTS = [
    ("invalid json", "/v1/chat/completions", b'{"messages": [', 400, None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("messages not a list", "/v1/chat/completions", {"messages": "Hi"}, 400, None),
    ("temperature as string", "/v1/chat/completions", {"messages": MSG, "temperature": "hot"}, 400, None),
    ("max_tokens as string", "/v1/chat/completions", {"messages": MSG, "max_tokens": "10"}, 400, None),
    ("stop as number", "/v1/chat/completions", {"messages": MSG, "stop": 5}, 400, None),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("unknown model", "/v1/chat/completions", {"messages": MSG, "model": "gpt-17"}, 404, "model_not_found"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, None),
    ("negative max_tokens", "/v1/chat/completions", {"messages": MSG, "max_tokens": -5}, 400, None),
    ("zero max_tokens", "/v1/chat/completions", {"messages": MSG, "max_completion_tokens": 0}, 400, None),
    ("n=0", "/v1/chat/completions", {"messages": MSG, "n": 0}, 400, None),
    ("n too large", "/v1/chat/completions", {"messages": MSG, "n": 99}, 400, None),
    ("top_p out of range", "/v1/chat/completions", {"messages": MSG, "top_p": 1.5}, 400, None),
    ("kwargs not an object", "/v1/chat/completions", {"messages": MSG, "chat_template_kwargs": "x"}, 400, None),
    ("kwargs a list", "/v1/chat/completions", {"messages": MSG, "chat_template_kwargs": [1]}, 400, None),
    ("kwargs reserved name", "/v1/chat/completions", {"messages": MSG, "chat_template_kwargs": {"messages": []}},
     400, "chat_template_error"),
    ("image content (template input error)", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "chat_template_error"),
    ("prompt too long", "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 700}]},
     400, "context_length_exceeded"),
    ("completion prompt too long", "/v1/completions", {"prompt": "word " * 700}, 400, "context_length_exceeded"),
    ("completion token out of range", "/v1/completions", {"prompt": [1, 10 ** 9]}, 400, None),
    ("completion empty prompt", "/v1/completions", {"prompt": ""}, 400, None),
    ("completion logprobs too many", "/v1/completions", {"prompt": "x", "logprobs": 99}, 400, None),
    ("completion echo", "/v1/completions", {"prompt": "x", "echo": True}, 400, None),
    ("logit_bias key not a token id", "/v1/chat/completions", {"messages": MSG, "logit_bias": {"abc": 1}}, 400,
     None),
    ("logit_bias token out of range", "/v1/chat/completions", {"messages": MSG, "logit_bias": {"99999999": 1}},
     400, None),
    ("logit_bias value out of range", "/v1/chat/completions", {"messages": MSG, "logit_bias": {"42": 150}}, 400,
     None),
    ("logit_bias value a string", "/v1/completions", {"prompt": "x", "logit_bias": {"42": "ban"}}, 400, None),
    ("response_format json", "/v1/chat/completions", {"messages": MSG, "response_format": {"type": "json_object"}},
     400, None),
]


@pytest.mark.parametrize("name,path,body,status,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request(server, name, path, body, status, code):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    started = time.monotonic()
    r = server.post(path, **kw)
    assert time.monotonic() - started < 10, "a bad request must be refused, not queued"
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err and "code" in err
    if code:
        assert err["code"] == code
    _assert_still_healthy(server)


def _assert_still_healthy(server):
    r = server.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


def test_oversized_body_413(server):
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * (9 << 20) + b'"}]}'
    r = server.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["message"]
    _assert_still_healthy(server)


def test_huge_max_tokens_clamped_to_context(server):
    # llama-server behaviour: the budget is clamped to what the slot's context leaves, not refused.
    prompt = "word " * 480
    r = server.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10 ** 9, "temperature": 0,
                                             "ignore_eos": True})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["total_tokens"] == SLOT_CTX and r.json()["choices"][0]["finish_reason"] == "length"


def test_api_key_required(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="smol", messages=MSG, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/slots").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key
    _assert_still_healthy(server)


# ---- metrics, disconnects, shutdown ---------------------------------------------------------------------------------

def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics(server):
    before = server.get("/metrics").text
    for name in ("dflash:requests_total", "dflash:prompt_tokens_total", "dflash:generation_tokens_total",
                 "dflash:num_requests_waiting", "dflash:num_requests_running",
                 "dflash:time_to_first_token_seconds_bucket", "dflash:inter_token_latency_seconds_bucket",
                 "dflash:spec_decode_num_drafts_total", "dflash:spec_decode_num_draft_tokens_total",
                 "dflash:spec_decode_num_accepted_tokens_total", "dflash:kv_cache_usage_perc",
                 "dflash:prefix_cache_pages"):
        assert name in before, name
    r = _chat(server.client(), "Hello", 5)
    after = server.get("/metrics").text
    assert _metric(after, "dflash:generation_tokens_total") - _metric(before, "dflash:generation_tokens_total") \
        == r.usage.completion_tokens
    assert _metric(after, "dflash:prompt_tokens_total") - _metric(before, "dflash:prompt_tokens_total") \
        == r.usage.prompt_tokens
    assert _metric(after, "dflash:time_to_first_token_seconds_count") \
        == _metric(before, "dflash:time_to_first_token_seconds_count") + 1
    assert _metric(after, "dflash:inter_token_latency_seconds_count") \
        >= _metric(before, "dflash:inter_token_latency_seconds_count") + r.usage.completion_tokens - 1
    assert _metric(after, "dflash:requests_total") > _metric(before, "dflash:requests_total")


def test_prompt_cache(server):
    """Two chats sharing a long system prompt: the second reuses its pages (usage, timings and the metric say how
    many tokens), answers as it does with `cache_prompt: false`, which computes the whole prompt again."""
    system = PROMPTS[4] + " " + PROMPTS[7]

    def ask(question: str, **kw):
        return server.client().chat.completions.create(
            model="smol", messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=8, temperature=0, **kw)

    props = server.get("/props").json()
    assert props["prefix_cache"] is True and props["prefix_cache_replies"] is True  # CPU: not batch-invariant
    ask("Hi!")
    before = server.get("/metrics").text
    cached, fresh = ask("List three colours."), ask("List three colours.", extra_body={"cache_prompt": False})
    after = server.get("/metrics").text
    n_cached = cached.usage.prompt_tokens_details.cached_tokens
    assert n_cached >= 48 and n_cached % 16 == 0 and n_cached < cached.usage.prompt_tokens  # whole 16-token pages
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert cached.model_extra["timings"]["cache_n"] == n_cached
    assert cached.model_extra["timings"]["prompt_n"] == cached.usage.prompt_tokens - n_cached
    assert cached.choices[0].message.content == fresh.choices[0].message.content
    assert _metric(after, "dflash:prompt_tokens_cached_total") \
        - _metric(before, "dflash:prompt_tokens_cached_total") == n_cached
    assert _metric(after, "dflash:prefix_cache_pages") >= n_cached // 16
    assert 0 <= _metric(after, "dflash:kv_cache_usage_perc") < 1

    # the next turn of a chat: its prompt holds the first turn's reply, whose pages are cached too
    story = [{"role": "system", "content": system}, {"role": "user", "content": "Tell me a long story."}]
    first = server.client().chat.completions.create(model="smol", messages=story, max_tokens=40, temperature=0)
    assert first.usage.completion_tokens == 40
    turn = story + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "Shorter, please."}]
    second = server.client().chat.completions.create(model="smol", messages=turn, max_tokens=8, temperature=0)
    fed = first.usage.prompt_tokens + 40 - 1  # the reply's last token was never fed
    assert fed // 16 * 16 - 16 <= second.usage.prompt_tokens_details.cached_tokens <= fed
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens


@pytest.mark.parametrize("n", [1, 3])
def test_stream_disconnect_frees_slot(server, n):
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True, "n": n}
    with httpx.Client(headers=server.auth, timeout=60) as client:
        with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(5 + n):  # role chunks, then tokens
                next(line for line in lines if line.startswith("data: "))
            assert server.slots()["busy_slots"] == n
    closed = time.monotonic()
    assert server.wait_idle(3), server.slots()
    print(f"{n} slot(s) freed {time.monotonic() - closed:.2f}s after disconnect")


@pytest.mark.parametrize("n", [1, 3])
def test_non_stream_disconnect_frees_slot(server, n):
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "n": n}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.auth, timeout=3)
    assert server.wait_idle(3), server.slots()


def test_sigterm_drains_in_flight_request(server):
    """Runs last: SIGTERM while a stream is mid-flight; the stream still ends properly and the server exits 0."""
    body = {"messages": [{"role": "user", "content": "Count from one to twenty."}], "max_tokens": 30,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    events: list[dict] = []
    got_first = threading.Event()

    def read():
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.auth,
                          timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    got_first.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert got_first.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    reader.join(120)
    assert not reader.is_alive()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 30
    assert server.proc.wait(timeout=60) == 0
