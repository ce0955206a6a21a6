"""The FastAPI app: OpenAI-style endpoints over the engine, with errors always in OpenAI's JSON shape."""
from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from converters.chat_template import ChatTemplate, ChatTemplateError, normalize_messages, normalize_tools
from serve import schemas
from serve.generation import abandon, collect_events, start_request, stream_events
from serve.metrics import CountRequests, Metrics
from serve.schemas import ApiError

log = logging.getLogger("serve")

MAX_CHOICES = 16  # a body's `n`: each choice is its own request (own prefill, own slot)


@dataclass
class ServerState:
    """What the routes share; the engine fields stay None until the background loader has finished warm-up."""

    alias: str
    model_names: frozenset[str]  # names a request's `model` may use (alias, file name, stem)
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    engine: Any = None
    template: ChatTemplate | None = None
    bos_text: str = ""
    slot_ctx: int = 0  # tokens one request may occupy (prompt + generated)
    load_error: str | None = None
    loader: Callable[["ServerState"], None] | None = None
    metrics: Metrics = field(default_factory=Metrics)
    ready: threading.Event = field(default_factory=threading.Event)


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.loader is not None:
            threading.Thread(target=state.loader, args=(state,), name="model-loader", daemon=True).start()
        yield
        if state.engine is not None:  # uvicorn has already waited for open responses; this drains the rest
            await asyncio.to_thread(state.engine.stop, drain=True)

    app = FastAPI(title="dflash-jax", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(CountRequests, metrics=state.metrics)

    def authorize(request: HttpRequest) -> None:
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise ApiError(401, "Invalid API key", "authentication_error", "invalid_api_key")

    def engine_ready():
        if state.load_error:
            raise ApiError(500, f"model failed to load: {state.load_error}", "server_error")
        if not state.ready.is_set():
            raise ApiError(503, "Loading model", "unavailable_error", "model_loading")
        return state.engine

    guarded = [Depends(authorize)]

    @app.get("/health")
    async def health():
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=500)
        if not state.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        if state.engine is not None and state.engine.error:
            return JSONResponse({"status": "error", "error": state.engine.error}, status_code=500)
        return {"status": "ok"}

    @app.get("/v1/models")
    @app.get("/models", include_in_schema=False)
    async def models():  # public, as in llama-server: clients probe it before they have a key configured
        return {"object": "list", "data": [{"id": state.alias, "object": "model", "created": 0,
                                            "owned_by": "dflash-jax"}]}

    @app.get("/metrics", dependencies=guarded)
    async def metrics():
        stats = engine_stats(state.engine) if state.ready.is_set() else None
        body, content_type = state.metrics.render(stats)
        return Response(body, media_type=content_type)

    @app.get("/slots", dependencies=guarded)
    async def slots():
        return engine_stats(engine_ready())

    @app.post("/v1/chat/completions", dependencies=guarded)
    @app.post("/chat/completions", dependencies=guarded, include_in_schema=False)
    async def chat_completions(request: HttpRequest):
        body = await read_body(request, schemas.ChatCompletionRequest, state.max_body_bytes)
        check_common(body, state)
        if not body.messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        engine = engine_ready()
        prompt_ids = await asyncio.to_thread(render_chat, state, body)
        return await respond(request, state, engine, body, prompt_ids, chat=True)

    @app.post("/v1/completions", dependencies=guarded)
    @app.post("/completions", dependencies=guarded, include_in_schema=False)
    async def completions(request: HttpRequest):
        body = await read_body(request, schemas.CompletionRequest, state.max_body_bytes)
        check_common(body, state)
        engine = engine_ready()
        prompt_ids = await asyncio.to_thread(completion_prompt, state, body)
        return await respond(request, state, engine, body, prompt_ids, chat=False)

    @app.get("/props", dependencies=guarded)
    async def props():
        """llama-server's /props (what its web UI and client libraries read): slots, context, template."""
        engine = engine_ready()
        spec = getattr(engine, "spec", None)
        return {"model_alias": state.alias, "total_slots": engine.cfg.num_slots,
                "default_generation_settings": {"n_ctx": state.slot_ctx, "params": {
                    "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "n_predict": -1,
                    "speculative.n_max": spec.block - 1 if spec is not None else 0}},
                "chat_template": state.template.source if state.template is not None else None,
                "bos_token": state.template.bos_token if state.template is not None else "",
                "eos_token": state.template.eos_token if state.template is not None else "",
                "prefix_cache": bool(getattr(engine, "prefix_cache", False)),
                "prefix_cache_replies": bool(getattr(getattr(engine, "scheduler", None), "cache_generated", False)),
                "modalities": {"vision": False, "audio": False}, "build_info": "dflash-jax"}

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(request: HttpRequest):
        body = await read_body(request, schemas.TokenizeRequest, state.max_body_bytes)
        tok = engine_ready().tokenizer
        ids = await asyncio.to_thread(tok.encode, body.content, add_bos=body.add_special,
                                      parse_special=body.parse_special)  # a long text: not on the event loop
        if body.with_pieces:
            return {"tokens": [{"id": i, "piece": tok.decode([i])} for i in ids]}
        return {"tokens": ids}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(request: HttpRequest):
        body = await read_body(request, schemas.DetokenizeRequest, state.max_body_bytes)
        try:
            return {"content": engine_ready().tokenizer.decode(body.tokens)}
        except ValueError as e:  # an id outside the vocabulary
            raise ApiError(400, str(e), param="tokens") from None

    return app


def engine_stats(engine, attempts: int = 3) -> dict:
    """engine.stats() reads slots the engine thread is changing without a lock, so a read can catch a slot
    half-released (AttributeError on a request that just became None); such a read is simply retried."""
    for i in range(attempts):
        try:
            return engine.stats()
        except (AttributeError, TypeError):
            if i == attempts - 1:
                raise
    raise AssertionError("unreachable")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)  # FastAPI would answer 422; OpenAI answers 400
    async def validation_error(_, exc: RequestValidationError):
        return JSONResponse(schemas.error_body(describe_validation(exc)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(schemas.error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(schemas.error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)


async def read_body(request: HttpRequest, model, limit: int):
    """Parse the JSON body into `model`, refusing oversized bodies before buffering them."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                       code="request_too_large")
    raw = bytearray()
    async for chunk in request.stream():  # chunked bodies carry no length: count as they arrive
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    try:
        return model.model_validate_json(bytes(raw))
    except ValidationError as e:
        raise ApiError(400, describe_validation(e), param=_error_param(e)) from None


def describe_validation(e: ValidationError | RequestValidationError) -> str:
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def _error_param(e: ValidationError) -> str | None:
    errors = e.errors()
    return str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None


def check_common(body, state: ServerState) -> None:
    if body.model and body.model not in state.model_names:
        raise ApiError(404, f"The model `{body.model}` does not exist", code="model_not_found", param="model")
    if not 1 <= body.n <= MAX_CHOICES:
        raise ApiError(400, f"n must be between 1 and {MAX_CHOICES}", param="n")
    if body.response_format is not None and body.response_format.type != "text":
        # Silently returning free text to a client that asked for JSON would break it later, far from the cause.
        raise ApiError(400, f"response_format {body.response_format.type!r} is not supported (no constrained "
                            "decoding); only 'text'", param="response_format")


def encode_prompt(state: ServerState, text: str) -> list[int]:
    """llama-server tokenizes with parse_special and the vocab's add-BOS rule; a BOS the text already starts with
    (templates often write it) is not doubled."""
    tok = state.engine.tokenizer
    add_bos = tok.add_bos and not (state.bos_text and text.startswith(state.bos_text))
    return tok.encode(text, add_bos=add_bos, parse_special=True)


def render_chat(state: ServerState, body: schemas.ChatCompletionRequest) -> list[int]:
    try:
        raw = [m.model_dump(exclude_none=True) for m in body.messages]
        for m in raw:  # OpenAI's newer name for the system role, which chat templates don't know
            if m["role"] == "developer":
                m["role"] = "system"
        messages = normalize_messages(raw)
        tools = normalize_tools(body.tools)
        text = state.template.render(messages, add_generation_prompt=body.add_generation_prompt, tools=tools,
                                     **(body.chat_template_kwargs or {}))
    except ChatTemplateError as e:
        raise ApiError(400, str(e), code="chat_template_error") from None
    except (KeyError, TypeError, AttributeError) as e:  # malformed content parts / tool calls
        raise ApiError(400, f"malformed message: {type(e).__name__}: {e}", param="messages") from None
    return encode_prompt(state, text)


def completion_prompt(state: ServerState, body: schemas.CompletionRequest) -> list[int]:
    if body.echo:
        raise ApiError(400, "echo is not supported", param="echo")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise ApiError(400, "only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return encode_prompt(state, prompt)
    vocab = state.engine.tokenizer.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is out of range for a vocabulary of {vocab}", param="prompt")
    return list(prompt)


async def respond(request: HttpRequest, state: ServerState, engine, body, prompt_ids: list[int], chat: bool):
    reqs: list = []
    try:
        for i in range(body.n):
            reqs.append(start_request(state, engine, body, prompt_ids, i))
    except ApiError:
        for r in reqs:
            abandon(state, r)
        raise
    env = schemas.Envelope(chat, state.alias)
    if body.stream:
        return EventStreamResponse(stream_events(state, reqs, env, body.include_usage()), state, reqs)
    return JSONResponse(await collect_events(request, state, reqs, env))


class EventStreamResponse(StreamingResponse):
    """SSE response that cancels its request however the response ends early: a client gone before the first
    chunk never starts the generator, so a `finally` inside it would not run."""

    def __init__(self, content, state: ServerState, reqs: list):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._state, self._reqs = state, reqs

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for req in self._reqs:
                if req.finish_time is None and not req.cancelled.is_set():
                    abandon(self._state, req)
