"""Paged KV-cache bookkeeping: a block pool, per-request block lists and a prefix cache.

Pure Python, no tensors: the model runner owns the cache tensor, this module decides which
block holds which tokens.  A full block is identified by a hash chained over all tokens
before it, rooted in the request's model (its cache salt), so two requests for the same
model with the same prompt prefix share the blocks of that prefix, and no other model does.
Freed blocks keep their contents and hash until they are handed out again (least recently
freed first), so a repeated prompt hits the cache even after its first request finished.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from pesc_serve.engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash_key: tuple | None = None  # (parent hash key, tokens) once the block is full and cached


@dataclass
class KVCacheManager:
    """Allocates fixed-size blocks of token slots to requests."""

    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    blocks: list[Block] = field(init=False)
    free: "OrderedDict[int, None]" = field(init=False)  # insertion order = eviction order
    cached: dict[tuple, int] = field(init=False)  # hash key -> block id
    num_queries: int = field(default=0, init=False)
    num_hits: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self.free = OrderedDict((i, None) for i in range(self.num_blocks))
        self.cached = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _chain_keys(self, token_ids: list[int], num_full_blocks: int, salt: str = "") -> list[tuple]:
        keys: list[tuple] = []
        parent: int | str | None = salt or None  # the model's namespace roots the chain
        for b in range(num_full_blocks):
            tokens = tuple(token_ids[b * self.block_size : (b + 1) * self.block_size])
            key = (parent, tokens)
            keys.append(key)
            parent = hash(key)
        return keys

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids holding the longest cached prefix of the request's tokens.

        The last token is never taken from the cache: the model must run on at least one
        token to produce the next token's logits.
        """
        if not self.enable_prefix_caching:
            return []
        tokens = request.all_token_ids
        num_full = (len(tokens) - 1) // self.block_size
        self.num_queries += 1
        hits: list[int] = []
        for key in self._chain_keys(tokens, num_full, request.cache_salt):
            block_id = self.cached.get(key)
            if block_id is None:
                break
            hits.append(block_id)
        if hits:
            self.num_hits += 1
        return hits

    def can_allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        adopting = bool(cached_blocks) and not request.block_ids
        held = len(cached_blocks) if adopting else len(request.block_ids)
        computed = len(cached_blocks) * self.block_size if adopting else request.num_computed_tokens
        needed = self.blocks_needed(computed + num_new_tokens) - held
        reusable_free = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        return needed <= len(self.free) - reusable_free

    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give ``request`` blocks for ``num_new_tokens`` more tokens; False if the pool is short.

        ``cached_blocks`` (from :meth:`find_cached_prefix`) are adopted first, for a request
        that holds no blocks yet.
        """
        if not self.can_allocate(request, num_new_tokens, cached_blocks):
            return False
        if cached_blocks and not request.block_ids:
            for block_id in cached_blocks:
                block = self.blocks[block_id]
                if block.ref_count == 0:
                    del self.free[block_id]
                block.ref_count += 1
                request.block_ids.append(block_id)
                request.block_keys.append(block.hash_key)
            request.num_computed_tokens = len(cached_blocks) * self.block_size
            request.num_cached_tokens = request.num_computed_tokens
        needed = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        for _ in range(needed):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash_key is not None:
                self.cached.pop(block.hash_key, None)
                block.hash_key = None
            block.ref_count = 1
            request.block_ids.append(block_id)
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly completed blocks in the prefix cache (incrementally)."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        keys = request.block_keys
        if len(keys) >= num_full:
            return
        tokens = request.all_token_ids
        parent = hash(keys[-1]) if keys else (request.cache_salt or None)
        for b in range(len(keys), num_full):
            key = (parent, tuple(tokens[b * self.block_size : (b + 1) * self.block_size]))
            keys.append(key)
            parent = hash(key)
            block = self.blocks[request.block_ids[b]]
            if block.hash_key is None and key not in self.cached:
                block.hash_key = key
                self.cached[key] = block.block_id

    def free_request(self, request: Request) -> None:
        """Return the request's blocks; cached ones stay findable until reused."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        request.block_ids = []
        request.block_keys = []
