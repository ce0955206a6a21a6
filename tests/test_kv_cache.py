"""write_kv: every live token lands at its page and offset; padded tokens and tokens past a slot's pages are dropped
(nothing is written anywhere, the trash page included)."""
import jax.numpy as jnp
import numpy as np

from dflash_jax.kv_cache import TRASH_PAGE, AttentionMeta, token_positions, write_kv


def test_write_kv_drops_padding_and_unallocated_pages():
    rng = np.random.default_rng(0)
    num_pages, page, heads, dim = 9, 4, 2, 3
    pages = jnp.asarray(rng.normal(size=(num_pages, page, heads, dim)), jnp.float32).at[TRASH_PAGE].set(0.0)
    # slot 0: 5 of 8 tokens at positions 3..7 (pages 1, 2); slot 1: 8 tokens at 6..13, its third page unallocated;
    # slot 2: padded (q_len 0).
    page_table = jnp.asarray([[1, 2, TRASH_PAGE, TRASH_PAGE], [3, 4, TRASH_PAGE, TRASH_PAGE], [5, 6, 7, 8]],
                             jnp.int32)
    meta = AttentionMeta(q_lens=jnp.asarray([5, 8, 0], jnp.int32), kv_lens=jnp.asarray([8, 14, 0], jnp.int32),
                         page_table=page_table)
    new = jnp.asarray(rng.normal(size=(3, 8, heads, dim)), jnp.float32)
    positions, valid = token_positions(meta, 8)
    out = np.asarray(write_kv(pages, new, meta, positions, valid))
    want = np.asarray(pages).copy()
    for b in range(3):
        for t in range(int(meta.q_lens[b])):
            pos = int(positions[b, t])
            pid = int(page_table[b, pos // page])
            if pid != TRASH_PAGE:
                want[pid, pos % page] = np.asarray(new[b, t])
    np.testing.assert_array_equal(out, want)
    assert not out[TRASH_PAGE].any()
    # slot 1's tokens at positions 8..13 beyond page 4 (positions >= 8) were dropped, the ones before written
    np.testing.assert_array_equal(out[4, 2:], np.asarray(new[1, :2]))
