"""Shared fixtures: paths of the real GGUF models (from $DFLASH_MODELS or the fetch cache) and the `gpu` auto-skip."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from converters.fetch import MODELS, fetch_model, models_cache_dir


def model_file(name: str) -> Path:
    """A registered model's file: taken as-is from $DFLASH_MODELS when there, else fetched (once) into the cache."""
    spec = MODELS[name]
    env = os.environ.get("DFLASH_MODELS")
    if env and (Path(env) / spec.filename).is_file():
        return Path(env) / spec.filename  # a dev machine's pre-fetched copy; hashing it on every run would be wasted
    return fetch_model(name)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    env = os.environ.get("DFLASH_MODELS")
    return Path(env) if env else models_cache_dir()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return model_file("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen05_path() -> Path:
    return model_file("qwen2.5-coder-0.5b-instruct")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return  # don't pay for importing JAX when no selected test needs a GPU
    try:
        import jax

        platform = jax.devices()[0].platform
    except (ImportError, RuntimeError) as e:
        platform = f"unavailable ({e})"
    if platform != "gpu":
        skip = pytest.mark.skip(reason=f"needs an NVIDIA GPU; JAX platform is {platform}")
        for item in gpu_items:
            item.add_marker(skip)
