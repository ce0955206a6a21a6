"""Host-side allocator of KV-cache pages: a free list over pages 1..P-1 (page 0 is the trash page for padding)."""
from __future__ import annotations

from dflash_jax.kv_cache import TRASH_PAGE


class PageAllocator:
    def __init__(self, num_pages: int):
        assert num_pages >= 2, "need the trash page and at least one real page"
        self.num_pages = num_pages
        self._free = [p for p in range(num_pages - 1, -1, -1) if p != TRASH_PAGE]
        self._owned: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        self._owned.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            assert p in self._owned, f"page {p} freed twice or never allocated"
            self._owned.remove(p)
            self._free.append(p)
