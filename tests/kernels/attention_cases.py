"""Random paged-attention steps shared by the CPU and GPU kernel tests and the benchmark.

A step: B sequences with context lengths seq_lens (after this step) and query_lens new tokens
each; the whole cache is random (garbage beyond each context must never be read), block tables
are random permutations padded with blocks of other sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.kernels.attention import paged_attention, query_start_locations

# Output rounded once to its dtype; the reference runs the same inputs in float32.
TOLS = {  # (atol, rtol)
    torch.float32: (2e-5, 2e-5),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


@dataclass
class Step:
    q: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor  # [N, BS, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks]
    seq_lens: torch.Tensor  # [B]
    query_lens: torch.Tensor  # [B]
    query_index: torch.Tensor  # [T]
    max_query_len: int
    scale: float
    window: int | None

    def run(self, backend: str, *, float32: bool = False, **kwargs) -> torch.Tensor:
        cast = (lambda t: t.float()) if float32 else (lambda t: t)
        return paged_attention(cast(self.q), cast(self.k_cache), cast(self.v_cache), self.block_tables,
                               self.seq_lens, self.query_lens, self.query_index, self.max_query_len, self.scale,
                               self.window, backend=backend, **kwargs)

    def reference(self) -> torch.Tensor:
        """The torch path in float32."""
        return self.run("torch", float32=True)

    @property
    def query_start_loc(self) -> torch.Tensor:
        return query_start_locations(self.query_lens)


def make_step(seq_lens: list[int], query_lens: list[int], heads: int, kv_heads: int, head_dim: int,
              block_size: int, dtype: torch.dtype = torch.float32, window: int | None = None, seed: int = 0,
              device: str = "cpu", table_dtype: torch.dtype = torch.int32, extra_blocks: int = 0) -> Step:
    gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device).manual_seed(seed)  # big tensors are drawn on the device
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(blocks_per_seq) + extra_blocks
    num_blocks = sum(blocks_per_seq) + 3
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=dev_gen, device=device).to(dtype)
    v_cache = torch.randn(cache_shape, generator=dev_gen, device=device).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    tables, used = [], 0
    for nb in blocks_per_seq:
        own = perm[used:used + nb]
        used += nb
        pad = torch.randint(0, num_blocks, (max_blocks - nb,), generator=gen)  # other sequences' blocks
        tables.append(torch.cat([own, pad]))
    num_tokens = sum(query_lens)
    max_q = max(query_lens)
    q = torch.randn(num_tokens, heads, head_dim, generator=dev_gen, device=device).to(dtype)
    index = torch.cat([torch.arange(ql) + b * max_q for b, ql in enumerate(query_lens)])
    return Step(q, k_cache, v_cache, torch.stack(tables).to(device, table_dtype),
                torch.tensor(seq_lens, device=device), torch.tensor(query_lens, device=device), index.to(device),
                max_q, head_dim ** -0.5, window)


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLS[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
