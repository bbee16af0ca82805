"""Paged KV-cache bookkeeping: a block pool with reference counts and a prefix cache.

Blocks hold ``block_size`` tokens. A full block of computed tokens gets a hash
chained over its parent's hash, its token ids and the adapter identity
(name, version), so identical prefixes under the same adapter version share
blocks. Free blocks keep their hash until reused; the free queue is LRU, so the
blocks freed longest ago are evicted first. Pure Python; the tensors live in the runner.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from loraplex.backend.engine.sequence import Sequence


def hash_block(parent: bytes | None, tokens: list[int], adapter_key: tuple[str, int] | None) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(repr(adapter_key).encode())
    h.update(array("q", tokens).tobytes())
    return h.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- capacity
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    # ---- prefix cache
    def update_hashes(self, seq: Sequence) -> None:
        """Extends the sequence's hash chain over every full block of its tokens."""
        bs = self.block_size
        known = seq.num_prompt_tokens + seq.num_output_tokens  # not the pending ones: their values are unknown
        while (len(seq.block_hashes) + 1) * bs <= known:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            tokens = [seq.token_at(j) for j in range(i * bs, (i + 1) * bs)]
            seq.block_hashes.append(hash_block(parent, tokens, seq.adapter_key))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix; leaves at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        self.update_hashes(seq)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def record_prefix_lookup(self, queried: int, hit: int) -> None:
        self.prefix_queries += queried
        self.prefix_hits += hit

    # ---- allocation
    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Gives ``seq`` blocks for ``num_computed_tokens + num_new_tokens`` tokens (after taking
        ``cached_blocks``). Returns False, changing nothing, when the pool is short."""
        if not cached_blocks and seq.num_computed_tokens + num_new_tokens <= len(seq.block_ids) * self.block_size:
            return True  # its blocks already hold these tokens (most decode steps)
        cached_blocks = cached_blocks or []
        reusable_free = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        total = seq.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        need = max(0, -(-total // self.block_size) - len(seq.block_ids) - len(cached_blocks))
        if need > len(self.free) - reusable_free:
            return False
        for block_id in cached_blocks:
            self._take(block_id)
        seq.block_ids.extend(cached_blocks)
        for _ in range(need):
            block_id = next(iter(self.free))
            self._evict(block_id)
            self._take(block_id)
            seq.block_ids.append(block_id)
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publishes the sequence's full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_blocks_published:
            return  # no block filled since the last call (most tokens)
        self.update_hashes(seq)
        num_full = min(num_full, len(seq.block_hashes))
        for i in range(seq.num_blocks_published, num_full):
            block = self.blocks[seq.block_ids[i]]
            if block.block_hash is None:
                block_hash = seq.block_hashes[i]
                if block_hash not in self.cached:
                    block.block_hash = block_hash
                    self.cached[block_hash] = block.block_id
        seq.num_blocks_published = max(seq.num_blocks_published, num_full)

    def free_seq(self, seq: Sequence) -> None:
        """Releases the sequence's blocks, tail first, so the LRU evicts tails before heads."""
        for block_id in reversed(seq.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_ids = []
        seq.num_blocks_published = 0

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block no sequence holds; True when none is left cached.

        Blocks in use keep their hash (their sequences still read them), so this is safe at any time.
        """
        for block_hash, block_id in list(self.cached.items()):
            if self.blocks[block_id].ref_count == 0:
                self.blocks[block_id].block_hash = None
                del self.cached[block_hash]
        return not self.cached

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash = None
