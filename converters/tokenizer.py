"""Builds a llama.cpp-exact tokenizer from GGUF tokenizer metadata on top of HuggingFace `tokenizers`."""
from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from converters.gguf_file import GGUFError, read_metadata

# GGUF token types (tokenizer.ggml.token_type).
TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp token attributes: a bit set, because llama.cpp adds CONTROL to EOG-looking tokens on top of their type.
ATTR_UNKNOWN, ATTR_UNUSED, ATTR_NORMAL, ATTR_CONTROL = 1, 2, 4, 8
ATTR_USER_DEFINED, ATTR_BYTE, ATTR_LSTRIP, ATTR_RSTRIP = 16, 32, 128, 256
_TYPE_TO_ATTR = {TYPE_UNKNOWN: ATTR_UNKNOWN, TYPE_UNUSED: ATTR_UNUSED, TYPE_NORMAL: ATTR_NORMAL,
                 TYPE_CONTROL: ATTR_CONTROL, TYPE_USER_DEFINED: ATTR_USER_DEFINED, TYPE_BYTE: ATTR_BYTE}

META_FILE = "tokenizer_meta.json"
HF_FILE = "tokenizer.json"
_META_VERSION = 1
_SPM_SPACE = "\u2581"  # SentencePiece's visible space

# Code points that Unicode 16 assigned and tokenizers' Oniguruma classifies, but llama.cpp's tables (Unicode 15.1)
# still treat as unassigned. They are cut out of the classes below so pre-tokenization splits exactly as llama.cpp's.
_NEW_L = (r"\x{1C89}-\x{1C8A}\x{A7CB}-\x{A7CD}\x{A7DA}-\x{A7DC}\x{105C0}-\x{105F3}\x{10D4A}-\x{10D65}"
          r"\x{10D6F}-\x{10D85}\x{10EC2}-\x{10EC4}\x{11380}-\x{11389}\x{1138B}\x{1138E}\x{11390}-\x{113B5}\x{113B7}"
          r"\x{113D1}\x{113D3}\x{11BC0}-\x{11BE0}\x{13460}-\x{143FA}\x{16100}-\x{1611D}\x{16D40}-\x{16D6C}\x{18CFF}"
          r"\x{1E5D0}-\x{1E5ED}\x{1E5F0}")
_NEW_N = (r"\x{10D40}-\x{10D49}\x{116D0}-\x{116E3}\x{11BF0}-\x{11BF9}\x{16130}-\x{16139}\x{16D70}-\x{16D79}"
          r"\x{1CCF0}-\x{1CCF9}\x{1E5F1}-\x{1E5FA}")
_NEW_M = (r"\x{897}\x{10D69}-\x{10D6D}\x{10EFC}\x{113B8}-\x{113C0}\x{113C2}\x{113C5}\x{113C7}-\x{113CA}"
          r"\x{113CC}-\x{113D0}\x{113D2}\x{113E1}-\x{113E2}\x{11F5A}\x{1611E}-\x{1612F}\x{1E5EE}-\x{1E5EF}")
_NEW_P = (r"\x{1B4E}-\x{1B4F}\x{1B7F}\x{10D6E}\x{113D4}-\x{113D5}\x{113D7}-\x{113D8}\x{11BE1}\x{16D6D}-\x{16D6F}"
          r"\x{1E5FF}")

_L = rf"[\p{{L}}&&[^{_NEW_L}]]"
_N = rf"[\p{{N}}&&[^{_NEW_N}]]"
_LM = rf"[[\p{{L}}\p{{M}}]&&[^{_NEW_L}{_NEW_M}]]"
_NOT_RN_L_N = rf"[[^\r\n\p{{L}}\p{{N}}]{_NEW_L}{_NEW_N}]"
_NOT_S_L_N = rf"[[^\s\p{{L}}\p{{N}}]{_NEW_L}{_NEW_N}]"
_NOT_S_L_M_N = rf"[[^\s\p{{L}}\p{{M}}\p{{N}}]{_NEW_L}{_NEW_M}{_NEW_N}]"
_P_OR_SYM = rf"[[\p{{P}}&&[^{_NEW_P}]]\$\+<=>\^~\|]"

# Pre-tokenizer regexes as llama.cpp applies them (src/llama-vocab.cpp): each later regex splits the pieces of the
# earlier. Same expressions as the models' tokenizer.json, with (?i:...) spelled out as llama.cpp does.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_RE_GPT2 = rf"'s|'t|'re|'ve|'m|'ll|'d| ?{_L}+| ?{_N}+| ?{_NOT_S_L_N}+|\s+(?!\S)|\s+"
_RE_LLAMA3 = _CONTRACTIONS + rf"|{_NOT_RN_L_N}?{_L}+|{_N}{{1,3}}| ?{_NOT_S_L_N}+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_RE_QWEN2 = _CONTRACTIONS + rf"|{_NOT_RN_L_N}?{_L}+|{_N}| ?{_NOT_S_L_N}+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_RE_QWEN35 = _CONTRACTIONS + rf"|{_NOT_RN_L_N}?{_LM}+|{_N}| ?{_NOT_S_L_M_N}+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@dataclass(frozen=True)
class _PreType:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is already a whole token skips BPE (llama3-style vocabularies)
    add_bos: bool = False        # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


_DEFAULT = _PreType((_P_OR_SYM + "+", _RE_GPT2, _N + "+", r"[0-9][0-9][0-9]"))
_LLAMA3 = _PreType((_RE_LLAMA3,), ignore_merges=True, add_bos=True)
_DBRX = _PreType((_RE_LLAMA3,))
_GPT2 = _PreType((_RE_GPT2,))
_QWEN2 = _PreType((_RE_QWEN2,))
_QWEN35 = _PreType((_RE_QWEN35,))
_SMOLLM = _PreType((_N, _RE_GPT2))

PRE_TYPES: dict[str, _PreType] = {
    "default": _DEFAULT,
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"],
                    _LLAMA3),
    **dict.fromkeys(["dbrx", "smaug-bpe"], _DBRX),
    **dict.fromkeys(["gpt-2", "phi-2", "gigachat", "a.x-4.0", "mellum", "mpt", "olmo", "jais", "exaone4"], _GPT2),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"], _QWEN2),
    "qwen35": _QWEN35,
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"], _SMOLLM),
}

# Token texts llama.cpp recognises by name (llama_vocab::impl::load), since GGUF files rarely carry these ids.
_AUTO_SLOTS = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
            "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
))
_ID_KEYS = {  # slot -> GGUF keys, later keys win (llama.cpp reads the deprecated prefix/suffix/middle ids last)
    "bos": ("bos_token_id",), "eos": ("eos_token_id",), "eot": ("eot_token_id",), "eom": ("eom_token_id",),
    "unk": ("unknown_token_id",), "pad": ("padding_token_id",),
    "fim_pre": ("fim_pre_token_id", "prefix_token_id"), "fim_suf": ("fim_suf_token_id", "suffix_token_id"),
    "fim_mid": ("fim_mid_token_id", "middle_token_id"), "fim_pad": ("fim_pad_token_id",),
    "fim_rep": ("fim_rep_token_id",), "fim_sep": ("fim_sep_token_id",),
}
_C_ISSPACE = " \t\n\v\f\r"  # llama.cpp strips around LSTRIP/RSTRIP tokens with C isspace(), not str.isspace()


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_decoder():
    """str.translate table turning byte-level token text into latin-1 text; unmapped chars become U+FFFF to fail."""
    table = {ord(ch): b for b, ch in _byte_to_unicode().items()}
    for cp in range(256):
        table.setdefault(cp, 0xFFFF)
    return table


def _token_pieces(kind: str, tokens: list[str], attrs: list[int]) -> list[bytes]:
    """What llama.cpp's token_to_piece(special=true) yields per token: the bytes a token stands for in output."""
    translate = _byte_level_decoder() if kind == "bpe" else None
    pieces = []
    for text, attr in zip(tokens, attrs):
        if attr & (ATTR_CONTROL | ATTR_UNKNOWN | ATTR_USER_DEFINED):
            pieces.append(text.encode("utf-8"))
        elif attr & ATTR_NORMAL:
            if translate is None:
                pieces.append(text.replace(_SPM_SPACE, " ").encode("utf-8"))
            else:
                try:
                    pieces.append(text.translate(translate).encode("latin-1"))
                except UnicodeEncodeError:  # not byte-level text (broken vocab): keep it readable rather than lose it
                    pieces.append(text.encode("utf-8"))
        elif attr & ATTR_BYTE and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            pieces.append(bytes([int(text[3:5], 16)]))
        else:  # unused / undefined tokens render as nothing in llama.cpp
            pieces.append(b"")
    return pieces


class Tokenizer:
    """Text <-> token ids exactly as llama.cpp's llama_tokenize / llama_token_to_piece would produce them."""

    def __init__(self, hf: HFTokenizer, meta: dict):
        self._hf = hf
        self._meta = meta
        self._kind: str = meta["kind"]
        self._tokens: list[str] = meta["tokens"]
        self._attrs: list[int] = meta["attrs"]
        self.vocab_size: int = len(self._tokens)
        self.bos_id: int | None = meta["bos_id"]
        self.eos_id: int | None = meta["eos_id"]
        self.add_bos: bool = meta["add_bos"]
        self.add_eos: bool = meta["add_eos"]
        self.add_space_prefix: bool = meta["add_space_prefix"]
        self.eog_ids: frozenset[int] = frozenset(meta["eog_ids"])
        self.chat_template: str | None = meta.get("chat_template")
        # llama.cpp splits out special tokens longest first (by byte length); ties keep id order.
        special = [i for i, a in enumerate(self._attrs) if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)]
        special.sort(key=lambda i: -len(self._tokens[i].encode("utf-8")))
        parsed = [(self._tokens[i], i, self._attrs[i]) for i in special]
        # Without parse_special llama.cpp still cuts out user-defined tokens, never control/unknown ones.
        unparsed = [s for s in parsed if not s[2] & (ATTR_CONTROL | ATTR_UNKNOWN)]
        self._splitters = {True: _SpecialSplitter(parsed), False: _SpecialSplitter(unparsed)}
        self._pieces = _token_pieces(self._kind, self._tokens, self._attrs)
        skip = ATTR_CONTROL | ATTR_UNKNOWN
        self._pieces_skip = [b"" if a & skip else p for p, a in zip(self._pieces, self._attrs)]

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        metadata = read_metadata(path)  # header + metadata only: ~0.3 s for a 151k vocabulary; GGUFError if broken
        return cls.from_metadata(metadata, source=str(path))

    @classmethod
    def from_metadata(cls, metadata: dict, source: str = "<metadata>") -> "Tokenizer":
        def fail(problem: str):
            raise GGUFError(source, problem)

        model = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            fail("no tokenizer in metadata (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
        # llama.cpp renames empty tokens so every text maps to exactly one id.
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        n = len(tokens)
        types = metadata.get("tokenizer.ggml.token_type")
        if types is None:
            types = [TYPE_NORMAL] * n
        elif len(types) < n:
            fail(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        attrs = [_TYPE_TO_ATTR.get(int(t), 0) for t in types[:n]]

        if model == "gpt2":
            kind = "bpe"
            pre_name = metadata.get("tokenizer.ggml.pre") or "default"
            pre = PRE_TYPES.get(pre_name)
            if pre is None:
                fail(f"unsupported tokenizer.ggml.pre {pre_name!r}; supported: {', '.join(sorted(PRE_TYPES))}")
            merges = metadata.get("tokenizer.ggml.merges")
            if merges is None:
                fail("BPE tokenizer without tokenizer.ggml.merges")
            hf = _build_bpe(tokens, merges, pre)
            add_bos, add_space_prefix = pre.add_bos, False
            defaults = {"bos": 11, "eos": 11}
        elif model == "llama":
            kind, pre_name = "spm", "default"
            scores = metadata.get("tokenizer.ggml.scores")
            if scores is None or len(scores) < n:
                fail("SentencePiece (llama) tokenizer needs tokenizer.ggml.scores for every token")
            hf = _build_spm(tokens, scores, attrs)
            add_bos, add_space_prefix = True, True
            defaults = {"bos": 1, "eos": 2, "unk": 0}
        else:
            fail(f"unsupported tokenizer.ggml.model {model!r}; "
                 "supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece)")

        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", add_space_prefix))
        ids = _special_ids(metadata, tokens, attrs, defaults)
        eog = _mark_eog(tokens, attrs, ids)
        _apply_strip_attrs(str(metadata.get("general.name", "")), tokens, attrs)
        if add_bos and ids["bos"] is None:
            fail("tokenizer.ggml.add_bos_token is set but the file has no valid BOS token")
        meta = {
            "version": _META_VERSION, "kind": kind, "pre": pre_name, "tokens": tokens, "attrs": attrs,
            "bos_id": ids["bos"], "eos_id": ids["eos"],
            "add_bos": add_bos, "add_eos": add_eos and ids["eos"] is not None,
            "add_space_prefix": add_space_prefix, "eog_ids": sorted(eog),
            "chat_template": metadata.get("tokenizer.chat_template"),
        }
        return cls(hf, meta)

    def save(self, directory) -> None:
        os.makedirs(directory, exist_ok=True)
        self._hf.save(os.path.join(directory, HF_FILE))
        with open(os.path.join(directory, META_FILE), "w", encoding="utf-8") as f:
            json.dump(self._meta, f, ensure_ascii=False)

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        meta_path = os.path.join(directory, META_FILE)
        hf_path = os.path.join(directory, HF_FILE)
        for p in (meta_path, hf_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: missing (write it with Tokenizer.save)")
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("version") != _META_VERSION:
            raise ValueError(f"{meta_path}: tokenizer meta version {meta.get('version')!r}, expected {_META_VERSION}")
        return cls(HFTokenizer.from_file(hf_path), meta)

    # ---- encode / decode ----------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, as llama_tokenize(text, add_special, parse_special) returns them.

        add_bos=None follows the file like llama.cpp's add_special (BOS, and EOS where the file asks for it);
        True/False force BOS on/off and never add EOS. parse_special=True turns special-token texts such as
        '<|im_start|>' into their ids; user-defined tokens are matched either way, as in llama.cpp.
        """
        bos, eos = (self.add_bos, self.add_eos) if add_bos is None else (add_bos, False)
        out: list[int] = []
        if bos:
            if self.bos_id is None:
                raise ValueError("add_bos requested but this vocabulary has no BOS token")
            out.append(self.bos_id)
        fragments = self._split_special(text, parse_special) if text else []
        if self._kind == "spm":
            fragments = self._spm_fragments(fragments)
        raw = [f for f in fragments if isinstance(f, str)]
        encoded = iter(self._hf.encode_batch_fast(raw, add_special_tokens=False) if len(raw) > 1
                       else [self._hf.encode(r, add_special_tokens=False) for r in raw])
        for f in fragments:
            if isinstance(f, str):
                out.extend(next(encoded).ids)
            else:
                out.append(f)
        if eos:
            out.append(self.eos_id)
        return out

    def _split_special(self, text: str, parse_special: bool) -> list:
        return self._splitters[bool(parse_special)].split(text)

    def _spm_fragments(self, fragments: list) -> list:
        # SentencePiece sees spaces as U+2581 and, like llama.cpp, gets a leading space at the start of the text
        # and after every special token.
        out = []
        prev_special = True
        for f in fragments:
            if isinstance(f, str):
                if self.add_space_prefix and prev_special:
                    f = " " + f
                out.append(f.replace(" ", _SPM_SPACE))
                prev_special = False
            else:
                out.append(f)
                prev_special = True
        return out

    def decode(self, ids, skip_special: bool = False) -> str:
        """Concatenated token pieces (what llama.cpp streams), invalid UTF-8 replaced by U+FFFD."""
        table = self._pieces_skip if skip_special else self._pieces
        ids = list(ids)
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} out of range for vocabulary of {self.vocab_size}")
        return b"".join([table[i] for i in ids]).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._pieces[token_id]

    def piece_bytes(self, token_id: int, skip_special: bool = False) -> bytes:
        """Raw bytes of one token, empty for control/unknown tokens when skip_special (for incremental detok)."""
        return (self._pieces_skip if skip_special else self._pieces)[token_id]

    def is_special(self, token_id) -> bool:
        return bool(self._attrs[token_id] & ATTR_CONTROL)

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry as stored in the GGUF (byte-level / SentencePiece form)."""
        return self._tokens[token_id]

    def token_to_id(self, text: str) -> int | None:
        """Id of the vocabulary entry spelled exactly `text` (e.g. '<|im_start|>'), or None."""
        return self._hf.token_to_id(text)

    def __repr__(self) -> str:
        return f"Tokenizer({self._kind}, pre={self._meta['pre']!r}, vocab_size={self.vocab_size})"


class _SpecialSplitter:
    """Cuts special-token texts out of text the way llama.cpp's tokenizer_st_partition does.

    llama.cpp tries the tokens longest first over the whole text (not leftmost-first), cutting every occurrence of
    one token before looking for the next. A single regex scan first narrows the tokens to those present, so the
    exact token-by-token pass only runs over a handful.
    """

    def __init__(self, specials: list[tuple[str, int, int]]):
        self._specials = specials  # (text, id, attrs), longest first
        texts = [t for t, _, _ in specials]
        self._rank = {t: r for r, t in enumerate(texts)}
        # At each position the scan reports the longest token starting there; shorter tokens starting at the same
        # place are its prefixes, added from this table.
        self._scan = re.compile("(?=(" + _trie_pattern(texts) + "))") if texts else None
        known = set(texts)
        self._prefixes = {t: [t[:k] for k in range(1, len(t)) if t[:k] in known] for t in texts}

    def split(self, text: str) -> list:
        if self._scan is None:
            return [text]
        present = set()
        for m in self._scan.finditer(text):
            found = m.group(1)
            if found not in present:
                present.add(found)
                present.update(self._prefixes[found])
        if not present:
            return [text]
        frags: list = [text]
        for rank in sorted(self._rank[t] for t in present):
            tok_text, tok_id, attr = self._specials[rank]
            new: list = []
            for f in frags:
                if not isinstance(f, str) or tok_text not in f:
                    new.append(f)
                    continue
                parts = f.split(tok_text)
                last = len(parts) - 1
                for j, part in enumerate(parts):
                    if j > 0 and attr & ATTR_RSTRIP:
                        part = part.lstrip(_C_ISSPACE)
                    if j < last and attr & ATTR_LSTRIP:
                        part = part.rstrip(_C_ISSPACE)
                    if j > 0:
                        new.append(tok_id)
                    if part:
                        new.append(part)
            frags = new
        return frags


def _trie_pattern(words: list[str]) -> str:
    """A regex matching the longest of `words` at a position; a prefix trie keeps thousands of words fast."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        branches = []
        for ch, child in node.items():
            if not ch:
                continue
            run = ch
            while len(child) == 1 and "" not in child:  # fold single-child chains into one literal
                (ch2, child), = child.items()
                run += ch2
            branches.append(re.escape(run) + emit(child))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # Greedy optional: try longer tokens first, fall back to ending here.
        return f"(?:{body})?" if "" in node else body

    return emit(trie)


def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    # Duplicate texts resolve to the last id, as llama.cpp's token_to_id map does.
    return {t: i for i, t in enumerate(tokens)}


def _merge_pairs(merges: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """GGUF merge strings as (left, right) pairs, keeping only merges of tokens into a token.

    HF's BPE refuses (or panics on) any other merge, and llama.cpp could never emit such a result as one id anyway.
    Well-formed vocabularies take the fast path: C-level map/all instead of a Python loop over ~300k merges.
    """
    if not any(map(str.startswith, merges, itertools.repeat(" "))):
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        if (all(map((2).__eq__, map(len, pairs)))
                and all(map(vocab.__contains__, itertools.chain.from_iterable(pairs)))
                and all(map(vocab.__contains__, map("".join, pairs)))):
            return pairs
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)  # llama.cpp searches from index 1 so a merge may start with a literal space
        if cut > 0:
            a, b = m[:cut], m[cut + 1:]
            if a in vocab and b in vocab and a + b in vocab:
                pairs.append((a, b))
    return pairs


def _build_bpe(tokens: list[str], merges: list[str], pre: _PreType) -> HFTokenizer:
    vocab = _vocab_dict(tokens)
    pairs = _merge_pairs(merges, vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges, fuse_unk=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


def _build_spm(tokens: list[str], scores, attrs: list[int]) -> HFTokenizer:
    """llama.cpp's SPM tokenizer as BPE: adjacent pieces merge into any token they spell, best score first.

    Every split of every token into two tokens becomes a merge ranked by the merged token's score. Equal scores
    (SentencePiece's whitespace-run tokens) are ranked longest result first, which reproduces llama.cpp's
    leftmost-first tie break for those runs.
    """
    vocab = _vocab_dict(tokens)
    ranked = []
    for i, t in enumerate(tokens):
        if vocab[t] != i:
            continue
        for k in range(1, len(t)):
            if t[:k] in vocab and t[k:] in vocab:
                ranked.append((-float(scores[i]), -len(t), i, k))
    ranked.sort()
    pairs = [(tokens[i][:k], tokens[i][k:]) for _, _, i, k in ranked]
    unk = next((t for t, a in zip(tokens, attrs) if a & ATTR_UNKNOWN), None)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, byte_fallback=True, fuse_unk=False))
    hf.decoder = decoders.Sequence([decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return hf


def _special_ids(metadata: dict, tokens: list[str], attrs: list[int],
                 defaults: dict[str, int]) -> dict[str, int | None]:
    """Special token ids with llama.cpp's defaults, GGUF overrides and by-name detection (which marks them CONTROL)."""
    n = len(tokens)
    ids: dict[str, int | None] = {}
    for slot, keys in _ID_KEYS.items():
        value = defaults.get(slot)
        if value is not None and value >= n:
            value = None
        for key in keys:
            new = metadata.get(f"tokenizer.ggml.{key}")
            if new is not None and 0 <= int(new) < n:
                value = int(new)
        ids[slot] = value
    by_text = _vocab_dict(tokens)
    for slot, names in _AUTO_SLOTS.items():
        if ids[slot] is not None:
            continue
        found = sorted(by_text[name] for name in names if name in by_text)
        if found:  # llama.cpp takes whichever its hash map yields first; the lowest id is our stable choice
            ids[slot] = found[0]
            attrs[found[0]] |= ATTR_CONTROL
    return ids


def _mark_eog(tokens: list[str], attrs: list[int], ids: dict[str, int | None]) -> set[int]:
    """End-of-generation ids, following llama.cpp's rules (including its model-specific exceptions)."""
    eog = {ids[s] for s in ("fim_pad", "fim_rep", "fim_sep") if ids[s] is not None}
    for i, t in enumerate(tokens):
        if t in _EOG_TEXTS:
            eog.add(i)
            attrs[i] |= ATTR_CONTROL
        elif t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss: always rendered
            attrs[i] = ATTR_USER_DEFINED
    eog |= {ids[s] for s in ("eos", "eot", "eom") if ids[s] is not None}
    texts = {tokens[i]: i for i in sorted(eog)}
    # o200k_harmony / solar-open end a message with <|end|> but keep generating, so it is not EOG there.
    if "<|end|>" in texts and (("<|return|>" in texts and "<|call|>" in texts)
                               or ("<|calls|>" in texts and "<|flush|>" in texts)):
        eog.discard(texts["<|end|>"])
        attrs[texts["<|end|>"]] = ATTR_USER_DEFINED
    # gemma4 / plamo use </s> as ordinary text.
    if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
        eog.discard(texts["</s>"])
        attrs[texts["</s>"]] = ATTR_NORMAL
    return eog


def _apply_strip_attrs(model_name: str, tokens: list[str], attrs: list[int]) -> None:
    # Phi-3 chat tokens swallow the whitespace after them in llama.cpp; other models have no strip attributes.
    name = model_name.lower()
    if "phi-3" not in name and "phi3" not in name:
        return
    for i, a in enumerate(attrs):
        if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) or tokens[i] == "</s>":
            attrs[i] |= ATTR_RSTRIP
    for i, t in enumerate(tokens):
        if t in ("<unk>", "<s>", "<|endoftext|>"):
            attrs[i] &= ~ATTR_RSTRIP


# The fast GGUF metadata reader now lives in converters.gguf_file; this name stays for callers of the old one.
_read_metadata = read_metadata
