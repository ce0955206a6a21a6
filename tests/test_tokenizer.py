"""GGUF tokenizer checked against llama.cpp's test vectors, round trips, streaming detok and live llama.cpp."""
from __future__ import annotations

import ctypes
import functools
import os
import random
import time
from pathlib import Path

import pytest

from converters.detokenizer import IncrementalDetokenizer
from converters.gguf_file import GGUFError
from converters.tokenizer import PRE_TYPES, Tokenizer

VOCAB_DIR = Path(__file__).parent / "data" / "vocab"
BPE_VOCABS = ["qwen2", "llama-bpe", "gpt-2"]
ALL_VOCABS = BPE_VOCABS + ["llama-spm"]
SEPARATOR = "\n__ggml_vocab_test__\n"


def _model_path(name: str) -> Path:
    path = Path(os.environ.get("DFLASH_MODELS", "/work/models")) / name
    if not path.is_file():
        pytest.skip(f"model file {path} not present")
    return path


@functools.lru_cache(maxsize=None)
def vocab(name: str) -> Tokenizer:
    return Tokenizer.from_gguf(VOCAB_DIR / f"ggml-vocab-{name}.gguf")


def read_vectors(name: str) -> list[tuple[str, list[int]]]:
    """The .inp/.out pair split exactly as llama.cpp's tests/test-tokenizer-0.cpp does."""
    raw = (VOCAB_DIR / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8")
    texts, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(SEPARATOR, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(SEPARATOR)
    lines = (VOCAB_DIR / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    assert len(texts) == len(lines), f"{name}: {len(texts)} inputs but {len(lines)} expected outputs"
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


# Characters chosen to stress pre-tokenization and byte-level merges: contractions, digit runs, whitespace kinds,
# combining marks, CJK, emoji (incl. ZWJ sequences), Unicode-16 code points llama.cpp still treats as unassigned.
_POOL = (list("abcXYZ 0123456789'\"!?.,;:-_()[]{}<>/\\\n\r\t") + [" ", "  ", "   ", "\n\n", "'s", "'LL", " 're"]
         + list("éüñßçøåæœ") + list("你好世界日本語한국어") + list("абвгдЖ") + list("αβγΩ")
         + ["🦙", "😀", "👨‍👩‍👧", "🚀", "✅", "e\u0301", "\u0301", "\u200d", "\ufe0f", "\u00a0", "\u3000", "\u2028",
            "\u0085", "\x0b", "\x0c", "٣", "¼", "Ⅻ", "\U0001d400", "\ue000", "\U00010d40", "\U000116d0", "\U0002ebf0"])


def random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    texts = ["".join(rng.choice(_POOL) for _ in range(rng.randint(1, 30))) for _ in range(n)]
    # plus arbitrary code points (any plane, no surrogates)
    for _ in range(n // 4):
        cps = [rng.choice([rng.randint(0x20, 0x7E), rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])
               for _ in range(rng.randint(1, 12))]
        texts.append("".join(map(chr, cps)))
    return texts


@pytest.mark.parametrize("name", ALL_VOCABS)
def test_llamacpp_vectors(name):
    # llama.cpp's test tokenizes with add_special=false, parse_special=false.
    tok = vocab(name)
    cases = read_vectors(name)
    assert len(cases) > 40
    wrong = [(text, got, want) for text, want in cases
             if (got := tok.encode(text, add_bos=False, parse_special=False)) != want]
    assert not wrong, f"{len(wrong)}/{len(cases)} mismatches, first: {wrong[0]!r}"


@pytest.mark.parametrize("name", BPE_VOCABS)
def test_roundtrip_arbitrary_unicode(name):
    tok = vocab(name)
    for text in random_texts(seed=len(name), n=300):
        ids = tok.encode(text, add_bos=False, parse_special=False)
        assert tok.decode(ids) == text, (text, ids)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_spm_roundtrip_adds_the_leading_space():
    # SentencePiece prefixes a space at the start of text; decode is the plain concatenation of pieces.
    tok = vocab("llama-spm")
    for text in random_texts(seed=7, n=150):
        ids = tok.encode(text, add_bos=False, parse_special=False)
        assert tok.decode(ids) == " " + text, (text, ids)


@pytest.mark.parametrize("text, want", [
    (" " * 16, [462, 29871]),
    ("a" + " " * 18 + "b", [263, 462, 29871, 289]),
    ("x" + " " * 33 + "\n", [921, 462, 462, 29871, 13]),
])
def test_spm_whitespace_runs_merge_leftmost_first(text, want):
    # All "▁▁…" tokens share one score; llama.cpp breaks the tie leftmost-first (ids recorded from llama_tokenize).
    assert vocab("llama-spm").encode(text, add_bos=False, parse_special=False) == want


@pytest.mark.parametrize("name", BPE_VOCABS)
def test_incremental_detokenizer_never_splits_a_character(name):
    tok = vocab(name)
    texts = ["🦙🚀 llamas 👨‍👩‍👧 go 你好世界, déjà vu", "日本語のテキスト😀😀😀 and ✅", "é\u0301\u0301 ⅫⅫ \U0001d400"]
    texts += random_texts(seed=11, n=100)
    saw_partial = False
    for text in texts:
        ids = tok.encode(text, add_bos=False, parse_special=False)
        saw_partial |= any(_is_partial_utf8(tok.token_bytes(i)) for i in ids)
        detok = IncrementalDetokenizer(tok, skip_special=False)
        chunks = [detok.push(i) for i in ids]
        chunks.append(detok.flush())
        assert "".join(chunks) == tok.decode(ids) == text
        if "\ufffd" not in text:  # a split character would surface as U+FFFD
            assert all("\ufffd" not in c for c in chunks), chunks
    assert saw_partial, "no token carried part of a character; the test would not exercise buffering"


def test_incremental_detokenizer_buffers_then_releases_an_emoji():
    tok = vocab("gpt-2")
    ids = tok.encode("🦙", add_bos=False)
    assert len(ids) == 3  # GPT-2 spells this emoji with three byte-level tokens
    detok = IncrementalDetokenizer(tok)
    outs = [detok.push(i) for i in ids]
    assert outs[:-1] == [""] * (len(ids) - 1) and outs[-1] == "🦙"
    assert detok.pending_bytes == 0 and detok.flush() == ""


def test_incremental_detokenizer_skips_control_tokens_and_matches_decode():
    tok = vocab("qwen2")
    ids = tok.encode("<|im_start|>assistant\nHi 🦙!<|im_end|>")
    assert 151644 in ids and 151645 in ids
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, skip_special=skip)
        text = "".join(detok.push(i) for i in ids) + detok.flush()
        assert text == tok.decode(ids, skip_special=skip)
    assert tok.decode(ids, skip_special=True) == "assistant\nHi 🦙!"
    assert tok.decode(ids) == "<|im_start|>assistant\nHi 🦙!<|im_end|>"


def test_incremental_detokenizer_flushes_an_unfinished_character():
    tok = vocab("gpt-2")
    ids = tok.encode("🦙", add_bos=False)
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[0]) == ""
    assert detok.pending_bytes > 0
    assert detok.flush() == "\ufffd" == tok.decode(ids[:1])


def test_qwen2_special_tokens_and_eog():
    tok = vocab("qwen2")
    im_start, im_end, eot = (tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert {im_end, eot} <= tok.eog_ids
    assert im_start not in tok.eog_ids
    assert tok.eos_id == eot and tok.bos_id == eot
    assert tok.is_special(im_start) and tok.is_special(im_end) and not tok.is_special(tok.encode("Hi")[0])
    assert tok.vocab_size == 151936


def test_parse_special_controls_whole_token_matching():
    tok = vocab("qwen2")
    text = "<|im_start|>user\nhello<|im_end|>"
    assert tok.encode(text) == [151644, *tok.encode("user\nhello"), 151645]
    plain = tok.encode(text, parse_special=False)
    assert 151644 not in plain and 151645 not in plain
    assert tok.decode(plain) == text
    # User-defined tokens are cut out even without parse_special, as in llama.cpp.
    pad = tok.token_to_id("[PAD151646]")
    assert not tok.is_special(pad)
    assert tok.encode("a[PAD151646]b", parse_special=False) == [*tok.encode("a"), pad, *tok.encode("b")]


def test_add_bos_follows_the_file_unless_forced():
    llama3, qwen2, spm = vocab("llama-bpe"), vocab("qwen2"), vocab("llama-spm")
    assert llama3.encode("Hello")[0] == llama3.bos_id == 128000  # llama3 pre type defaults to adding BOS
    assert qwen2.encode("Hello") == qwen2.encode("Hello", add_bos=False)  # qwen2 file does not ask for BOS
    assert qwen2.encode("Hello", add_bos=True)[0] == qwen2.bos_id
    assert spm.encode("Hello")[0] == spm.bos_id == 1
    assert spm.encode("Hello", add_bos=False) == spm.encode("Hello")[1:]
    assert spm.encode("") == [1] and spm.encode("", add_bos=False) == []


def test_save_load_roundtrip(tmp_path):
    for name in ("qwen2", "llama-spm"):
        tok = vocab(name)
        tok.save(tmp_path / name)
        assert {p.name for p in (tmp_path / name).iterdir()} == {"tokenizer.json", "tokenizer_meta.json"}
        loaded = Tokenizer.load(tmp_path / name)
        assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.eog_ids) == \
               (tok.vocab_size, tok.bos_id, tok.eos_id, tok.eog_ids)
        texts = random_texts(seed=3, n=60) + ["<|im_start|>user\nhi<|im_end|>", "<s> hello </s>", "   x  \n\n y"]
        for text in texts:
            for parse_special in (True, False):
                ids = tok.encode(text, parse_special=parse_special)
                assert loaded.encode(text, parse_special=parse_special) == ids, text
                assert loaded.decode(ids, skip_special=True) == tok.decode(ids, skip_special=True)


def test_load_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_meta.json"):
        Tokenizer.load(tmp_path)


def _qwen2_metadata() -> dict:
    from converters.tokenizer import _read_metadata  # the fast reader; same dict as open_gguf(...).metadata

    return _read_metadata(VOCAB_DIR / "ggml-vocab-qwen2.gguf")


def test_unknown_pre_type_raises_naming_the_source():
    metadata = dict(_qwen2_metadata(), **{"tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(GGUFError) as err:
        Tokenizer.from_metadata(metadata, source="/models/weird.gguf")
    msg = str(err.value)
    assert msg.startswith("/models/weird.gguf:") and "no-such-pre" in msg
    assert all(p in msg for p in ("qwen2", "smollm", "llama-bpe", "gpt-2", "default"))


def test_unknown_model_and_missing_vocab_raise():
    metadata = dict(_qwen2_metadata(), **{"tokenizer.ggml.model": "bert"})
    with pytest.raises(GGUFError, match=r"^<metadata>: unsupported tokenizer.ggml.model 'bert'"):
        Tokenizer.from_metadata(metadata)
    with pytest.raises(GGUFError, match="no tokenizer"):
        Tokenizer.from_metadata({"general.architecture": "llama"}, source="x.gguf")


def test_merges_that_do_not_form_tokens_are_ignored():
    from converters.tokenizer import _read_metadata

    metadata = _read_metadata(VOCAB_DIR / "ggml-vocab-gpt-2.gguf")
    bogus = dict(metadata, **{"tokenizer.ggml.merges": ["Ġ zzzq", "zz q", *metadata["tokenizer.ggml.merges"]]})
    tok, ref = Tokenizer.from_metadata(bogus), vocab("gpt-2")
    for text in (" zzzq zzq", "Hello world, zzq!"):
        assert tok.encode(text) == ref.encode(text)


def test_from_gguf_reports_broken_files(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(GGUFError, match="broken.gguf"):
        Tokenizer.from_gguf(bad)


def test_supported_pre_types_include_the_required_ones():
    assert {"smollm", "qwen2", "llama-bpe", "gpt-2", "default"} <= set(PRE_TYPES)


def test_building_a_151k_vocab_is_fast():
    start = time.perf_counter()
    tok = Tokenizer.from_gguf(VOCAB_DIR / "ggml-vocab-qwen2.gguf")
    elapsed = time.perf_counter() - start
    assert tok.vocab_size == 151936
    assert elapsed < 8.0, f"building took {elapsed:.1f}s"  # ~1-2 s on a 2-core VM; gguf.GGUFReader alone takes ~20 s


# ---- live comparison with llama.cpp (the tokenizer compiled into xllamacpp) -------------------------------------

SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_TEXTS = [
    "Hello world",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\n",
    "  leading spaces, trailing tabs\t\t\n\r\n  ",
    "It's 3.14159 and 1234567 apples; they'll say I'M sure we've DONE it.",
    "Grüße aus Köln — naïve café, déjà vu, Ωμέγα, Привет мир",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "emoji 🦙🚀👨‍👩‍👧 ✅ and combining e\u0301 marks",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>y<|im_end|><|im_end|>text<|im_start",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}  // JSON ```code```",
    "new Unicode 16: \U00010d40\U00010d41 \U000116d0 \U0001e5d0a",
]


class _LlamaCppTokenizer:
    """llama_tokenize / llama_token_to_piece from xllamacpp's bundled llama.cpp: the Server has no tokenize handler."""

    class _ModelParams(ctypes.Structure):
        # Opaque and oversized: defaults are passed through untouched, so the real layout does not matter.
        _fields_ = [("raw", ctypes.c_uint8 * 256)]

    def __init__(self, path: Path):
        xlc = pytest.importorskip("xllamacpp")
        lib = ctypes.CDLL(xlc.xllamacpp.__file__)
        lib.llama_model_default_params.restype = self._ModelParams
        lib.llama_model_load_from_file.argtypes = [ctypes.c_char_p, self._ModelParams]
        lib.llama_model_load_from_file.restype = ctypes.c_void_p
        lib.llama_model_get_vocab.argtypes = [ctypes.c_void_p]
        lib.llama_model_get_vocab.restype = ctypes.c_void_p
        lib.llama_model_free.argtypes = [ctypes.c_void_p]
        lib.llama_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32,
                                       ctypes.POINTER(ctypes.c_int32), ctypes.c_int32, ctypes.c_bool, ctypes.c_bool]
        lib.llama_tokenize.restype = ctypes.c_int32
        lib.llama_token_to_piece.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_char_p, ctypes.c_int32,
                                             ctypes.c_int32, ctypes.c_bool]
        lib.llama_token_to_piece.restype = ctypes.c_int32
        lib.llama_backend_init()
        self._lib = lib
        self._model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        assert self._model, f"llama.cpp could not load {path}"
        self._vocab = lib.llama_model_get_vocab(self._model)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (ctypes.c_int32 * cap)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        assert n >= 0, "token buffer too small"
        return list(buf[:n])

    def piece(self, token_id: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(512)
        n = self._lib.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, special)
        return buf.raw[:n]

    def close(self):
        self._lib.llama_model_free(self._model)


@pytest.fixture(scope="module")
def smollm_pair():
    path = _model_path(SMOLLM)
    ref = _LlamaCppTokenizer(path)
    yield Tokenizer.from_gguf(path), ref
    ref.close()


def test_smollm_matches_llamacpp(smollm_pair):
    tok, ref = smollm_pair
    assert tok.eog_ids == {0, 2, 4}  # <|endoftext|>, <|im_end|> and <reponame> (llama.cpp's FIM-repo rule)
    for text in SMOLLM_TEXTS:
        for add_special, parse_special in ((False, False), (False, True), (True, True)):
            want = ref.tokenize(text, add_special, parse_special)
            assert tok.encode(text, add_bos=None if add_special else False, parse_special=parse_special) == want, \
                (text, add_special, parse_special)
        ids = ref.tokenize(text, False, True)
        for special in (True, False):
            assert tok.decode(ids, skip_special=not special) == \
                   b"".join(ref.piece(i, special) for i in ids).decode("utf-8", "replace")


def _is_partial_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True
