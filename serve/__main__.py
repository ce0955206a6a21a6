"""`python -m serve`: answer /health at once, load and warm up the model in the background, drain on SIGTERM."""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import uvicorn

from serve.app import ServerState, create_app
from serve.cli import engine_config_kwargs, model_alias, parse_args, speculative

log = logging.getLogger("serve")

# llama.cpp's fallback when a model has no template of its own.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _default_model_file() -> Path:
    from converters.fetch import DEFAULT_MODEL, MODELS, models_cache_dir

    return models_cache_dir() / MODELS[DEFAULT_MODEL].filename  # only its name is needed before the fetch


def _slot_context(engine, cfg) -> int:
    """Tokens one request may hold (prompt + generated): the engine's per-slot cap."""
    per_slot = getattr(cfg, "per_slot", None) or getattr(cfg, "ctx_per_slot", None)
    return int(per_slot) if per_slot else int(engine.max_prompt_len) + 1


def make_loader(args, engine_kwargs: dict, use_drafter: bool, on_failure):
    def load(state: ServerState) -> None:
        try:
            import jax.numpy as jnp

            from converters.chat_template import ChatTemplate
            from converters.checkpoint import load_model
            from converters.fetch import default_model_path
            from dflash_jax.engine import Engine, EngineConfig

            path = args.model or default_model_path()
            log.info("loading %s", path)
            dtype = jnp.dtype(engine_kwargs["dtype"])
            loaded = load_model(path, dtype=dtype, weights=args.weights)
            drafter = None
            if use_drafter:
                from converters.checkpoint import load_drafter

                log.info("loading draft model %s", args.model_draft)
                drafter = load_drafter(args.model_draft, loaded.config, dtype=dtype)
            cfg = EngineConfig(**engine_kwargs)
            engine = Engine(loaded, cfg, drafter=drafter) if drafter is not None else Engine(loaded, cfg)
            tok = engine.tokenizer
            state.bos_text = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
            eos_text = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
            if not loaded.chat_template:
                log.warning("the model has no chat template; using ChatML")
            state.template = ChatTemplate(loaded.chat_template or CHATML, state.bos_text, eos_text,
                                          defaults=args.chat_template_kwargs)
            log.info("warming up (compiling every shape bucket)")
            engine.warmup(progress=True)
            engine.start()
            state.engine, state.slot_ctx = engine, _slot_context(engine, cfg)
            spec = getattr(engine, "spec", None)
            state.metrics.draft_width = spec.block - 1 if spec is not None else 0
            state.ready.set()
            log.info("ready: %d slots, %d tokens per slot", cfg.num_slots, state.slot_ctx)
        except BaseException as e:  # noqa: BLE001 - any failure must reach /health and the exit code
            log.exception("model loading failed")
            state.load_error = f"{type(e).__name__}: {e}"
            on_failure()

    return load


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Flags the engine cannot honour must fail now, before anything listens; this import loads JAX (seconds).
    import jax

    from dflash_jax.engine import Engine, EngineConfig

    engine_kwargs = engine_config_kwargs(args, EngineConfig, jax.default_backend())
    try:
        EngineConfig(**engine_kwargs)  # inconsistent flags (e.g. --ubatch-buckets against -ub) fail before loading
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    use_drafter = speculative(args, Engine)
    model_file = Path(args.model) if args.model else _default_model_file()
    alias = model_alias(args, model_file)
    names = {alias, model_file.name, model_file.stem, str(args.model or model_file)}
    state = ServerState(alias=alias, model_names=frozenset(names), api_key=args.api_key,
                        max_body_bytes=args.max_body_bytes)
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=args.host, port=args.port,
                                           log_level=args.log_level, timeout_graceful_shutdown=None))

    def stop_server() -> None:
        server.should_exit = True

    state.loader = make_loader(args, engine_kwargs, use_drafter, stop_server)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with the default handler
    # that would kill us with -SIGTERM after a clean drain, so swallow the re-raise and exit 0 instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if state.load_error:
        return 1
    if not state.ready.is_set():
        # Stopped during warm-up: the loader thread sits in JAX compilation, which interpreter teardown could
        # wait on or crash in; nothing needs flushing, so leave at once.
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
