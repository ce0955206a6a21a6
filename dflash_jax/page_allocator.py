"""Host-side allocator of KV-cache pages (page 0 is the trash page for padding) with a prefix cache: a full page of
prompt (or reply) tokens stays keyed by its tokens and everything before them after its request ends, and a later
prompt that starts with the same pages maps them into its slot instead of computing them again (vLLM's automatic
prefix caching, llama-server's cache_prompt).

A page is free (no owner, no key), held (reference-counted by the slots that map it) or idle (keyed, unreferenced:
reusable by a matching prompt until allocation evicts it, least recently used first). Idle pages count as free.
Shared pages are only read: a slot writes from its first uncached position on, which lies past every page it shares.
"""
from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np

from dflash_jax.kv_cache import TRASH_PAGE


def page_keys(tokens: Sequence[int], page_size: int, num_pages: int, start: int = 0, prev: bytes = b"") -> list[bytes]:
    """Keys of full pages start .. num_pages - 1 of `tokens` (prev: page start - 1's key): each a hash of the page's
    tokens and the previous key, so equal keys mean equal prefixes."""
    keys = []
    arr = np.asarray(tokens[:num_pages * page_size], np.int32)
    for i in range(start, num_pages):
        prev = hashlib.sha256(prev + arr[i * page_size:(i + 1) * page_size].tobytes()).digest()
        keys.append(prev)
    return keys


class PageAllocator:
    def __init__(self, num_pages: int):
        assert num_pages >= 2, "need the trash page and at least one real page"
        self.num_pages = num_pages
        self._free = [p for p in range(num_pages - 1, -1, -1) if p != TRASH_PAGE]
        self._refs: dict[int, int] = {}  # held pages
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._key_of: dict[int, bytes] = {}
        self._page_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._idle)

    @property
    def num_cached(self) -> int:
        """Pages holding a keyed prefix (held or idle)."""
        return len(self._key_of)

    def alloc(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"asked for {n} pages, {self.num_free} free")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:  # evict the least recently used idle prefix page
                page, _ = self._idle.popitem(last=False)
                del self._page_of[self._key_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            assert p in self._refs, f"page {p} freed twice or never allocated"
            self._refs[p] -= 1
            if self._refs[p]:
                continue
            del self._refs[p]
            if p in self._key_of:
                self._idle[p] = None
            else:
                self._free.append(p)

    def match(self, keys: list[bytes]) -> list[int]:
        """Pages of the longest run of `keys` (from the first) that are cached; nothing is taken yet."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def num_idle(self, pages: list[int]) -> int:
        """How many of `pages` are idle (taking them lowers num_free)."""
        return sum(p in self._idle for p in pages)

    def take(self, pages: list[int]) -> None:
        """Hold matched pages (one more reference each)."""
        for p in pages:
            if p in self._idle:
                del self._idle[p]
            self._refs[p] = self._refs.get(p, 0) + 1

    def register(self, page: int, key: bytes) -> None:
        """Key a held page whose tokens are now written (or about to be, by a launched step: later readers run after
        it). A page already keyed, or a key another page holds, stays as it is."""
        assert page in self._refs, f"page {page} is not held"
        if page not in self._key_of and key not in self._page_of:
            self._key_of[page], self._page_of[key] = key, page


class PrefixStates:
    """A hybrid model's prefix cache also needs the recurrent state after a prefix: rows of the state pool that hold
    it, each keyed like the prefix's last page (captured where a prefill chunk ends on a page boundary), the least
    recently used given up first."""

    def __init__(self, rows: Sequence[int]):
        self._free = list(rows)
        self._row_of: collections.OrderedDict[bytes, int] = collections.OrderedDict()

    def deepest(self, keys: list[bytes], hits: int) -> int:
        """The most of the first `hits` pages of `keys` after which a state is kept (0: none)."""
        return next((h for h in range(hits, 0, -1) if keys[h - 1] in self._row_of), 0)

    def take(self, key: bytes) -> int:
        self._row_of.move_to_end(key)
        return self._row_of[key]

    def claim(self, key: bytes) -> int | None:
        """A row to copy the state after `key` into, or None when one is kept already."""
        if key in self._row_of:
            self._row_of.move_to_end(key)
            return None
        if not (self._free or self._row_of):
            return None
        row = self._free.pop() if self._free else self._row_of.popitem(last=False)[1]
        self._row_of[key] = row
        return row
