"""Block pool bookkeeping and the prefix cache, without a model."""

from __future__ import annotations

from pesc_serve.engine.kv_cache import KVCacheManager
from pesc_serve.engine.request import Request, SamplingParams


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), max_tokens=16)


def _compute_all(kv: KVCacheManager, req: Request) -> None:
    assert kv.allocate(req, req.num_tokens - req.num_computed_tokens)
    req.num_computed_tokens = req.num_tokens
    kv.cache_full_blocks(req)


def test_allocate_and_free_returns_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = _req("a", list(range(10)))
    assert kv.allocate(r, 10)
    assert len(r.block_ids) == 3 and kv.num_free_blocks == 5
    assert 0 < kv.usage < 1
    kv.free_request(r)
    assert kv.num_free_blocks == 8 and kv.usage == 0.0 and r.block_ids == []


def test_allocation_fails_cleanly_when_pool_is_short():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = _req("a", list(range(12)))
    assert not kv.allocate(r, 12)
    assert r.block_ids == [] and kv.num_free_blocks == 2


def test_growth_allocates_only_missing_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = _req("a", list(range(4)))
    _compute_all(kv, r)
    assert len(r.block_ids) == 1
    r.output_token_ids.append(99)
    assert kv.allocate(r, 1)
    assert len(r.block_ids) == 2


def test_prefix_cache_shares_full_blocks_and_keeps_last_token_uncached():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = _req("a", list(range(10)))
    _compute_all(kv, a)
    b = _req("b", list(range(8)) + [50, 51, 52])
    hits = kv.find_cached_prefix(b)
    assert hits == a.block_ids[:2]
    assert kv.allocate(b, b.num_tokens - 8, hits)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert kv.blocks[hits[0]].ref_count == 2
    # A prompt that is exactly cached still computes its last token.
    c = _req("c", list(range(8)))
    assert len(kv.find_cached_prefix(c)) == 1


def test_freed_blocks_stay_cached_until_reused():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = _req("a", list(range(9)))
    _compute_all(kv, a)
    kv.free_request(a)
    again = _req("a2", list(range(9)))
    assert len(kv.find_cached_prefix(again)) == 2
    # Filling the pool with other data evicts them.
    other = _req("o", list(range(100, 116)))
    assert kv.allocate(other, 16)
    assert kv.find_cached_prefix(_req("a3", list(range(9)))) == []


def test_different_prefix_same_block_tokens_do_not_collide():
    kv = KVCacheManager(num_blocks=16, block_size=2)
    a = _req("a", [1, 2, 3, 4, 5])
    _compute_all(kv, a)
    b = _req("b", [9, 9, 3, 4, 5])
    assert kv.find_cached_prefix(b) == []


def test_prefix_caching_off():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = _req("a", list(range(9)))
    _compute_all(kv, a)
    assert kv.find_cached_prefix(_req("b", list(range(9)))) == []


def test_can_allocate_counts_tokens_after_an_adopted_prefix():
    kv = KVCacheManager(num_blocks=5, block_size=2)
    a = _req("a", list(range(5)))
    _compute_all(kv, a)  # 3 blocks, 2 of them full and cached
    b = _req("b", list(range(4)) + [60, 61, 62, 63, 64])
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 2
    # 5 tokens after the 4 cached ones need 3 more blocks; only 2 are free.
    assert not kv.can_allocate(b, 5, hits)
    assert not kv.allocate(b, 5, hits) and b.block_ids == []
    assert kv.allocate(b, 4, hits)
