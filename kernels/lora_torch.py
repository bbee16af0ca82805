"""Pure-torch float32 references for the batched LoRA ops (twins of ``lora_triton``).

Same signatures and semantics as the Triton wrappers. They sync with the host
(``tolist``/``unique``), so they serve the CPU path and the tests, never a
CUDA graph. Shapes: T tokens, S slots, R max rank, N = n*R, O = sum(out_slices).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .lora_plan import LoRATiles


def _tiles(tiles: LoRATiles) -> Iterator[tuple[torch.Tensor, int]]:
    """(rows, slot) per run of adjacent tiles of one slot (one matmul per adapter, not per tile)."""
    rows = tiles.rows.long()
    run: list[int] = []
    for slot, first, end, _ in tiles.table[:tiles.num_tiles].tolist() + [[-1, 0, 0, 0]]:
        if run and (slot != run[0] or first != run[2]):
            yield rows[run[1]:run[2]], run[0]
            run = []
        if slot >= 0:
            run = [slot, run[1] if run else first, end]


def _slot_groups(token_slots: torch.Tensor, num_tokens: int) -> Iterator[tuple[torch.Tensor, int]]:
    slots = token_slots[:num_tokens].long()
    for slot in torch.unique(slots).tolist():
        if slot >= 0:
            yield torch.nonzero(slots == slot).flatten(), slot


def _slices(out_slices: Sequence[int], r: int) -> Iterator[tuple[int, int, int]]:
    off = 0
    for i, out in enumerate(out_slices):
        yield i * r, off, out
        off += out


def _new_buf(x: torch.Tensor, n: int, buf: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h to return, [T, N] part to fill): of a [P, T, N] buffer, partial 0 alone (h = buf[:1]); zeroed."""
    if buf is None:
        buf = torch.empty((x.shape[0], n), dtype=torch.float32, device=x.device)
    h = buf if buf.dim() == 2 else buf[:1]
    h.zero_()
    return h, (h if h.dim() == 2 else h[0])


def _summed(buf: torch.Tensor) -> torch.Tensor:
    return buf if buf.dim() == 2 else buf.sum(0)


def _add_rows(y: torch.Tensor, rows: torch.Tensor | slice, delta: torch.Tensor, off: int, out: int) -> None:
    cols = slice(off, off + out)
    y[rows, cols] = (y[rows, cols].float() + delta).to(y.dtype)


def sgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, tiles: LoRATiles,
                buf: torch.Tensor | None = None) -> torch.Tensor:
    """h[rows] = ``x[rows].float() @ lora_a[slot].float().T`` per tile (lora_plan); 0 on base rows.

    x [T, H_in], lora_a [S, N, H_in] -> h [T, N] float32: buf, or buf[:1] of a [P, T, N] buf (h.sum(0)).
    """
    h, out = _new_buf(x, lora_a.shape[1], buf)
    for rows, slot in _tiles(tiles):
        out[rows] = x[rows].float() @ lora_a[slot].float().T
    return h


def bgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor,
                buf: torch.Tensor | None = None) -> torch.Tensor:
    """h[t] = ``lora_a[token_slots[t]].float() @ x[t].float()`` (0 on base rows).

    x [T, H_in], lora_a [S, N, H_in], token_slots [>=T] -> h [T, N] float32: buf, or buf[:1] of a [P, T, N] buf.
    """
    h, out = _new_buf(x, lora_a.shape[1], buf)
    for rows, slot in _slot_groups(token_slots, x.shape[0]):
        out[rows] = x[rows].float() @ lora_a[slot].float().T
    return h


def sgmv_expand(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                out_slices: Sequence[int], tiles: LoRATiles) -> None:
    """Per tile and slice: ``y[rows, off:off+out] += scales[slot] * h[rows, i*R:(i+1)*R] @ lora_b[slot, off:off+out].T``.

    y [T, O], h [T, n*R] (or [p, T, n*R] partials) float32, lora_b [S, O, R], scales [S].
    """
    r, h = lora_b.shape[2], _summed(h)
    for rows, slot in _tiles(tiles):
        scale = scales[slot].float()
        for c, off, out in _slices(out_slices, r):
            delta = scale * (h[rows, c:c + r] @ lora_b[slot, off:off + out].float().T)
            _add_rows(y, rows, delta, off, out)


def bgmv_expand(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                out_slices: Sequence[int], token_slots: torch.Tensor) -> None:
    """Per token and slice: ``y[t, off:off+out] += scales[s] * lora_b[s, off:off+out].float() @ h[t, i*R:(i+1)*R]``.

    y [T, O], h [T, n*R] (or [p, T, n*R] partials) float32, lora_b [S, O, R], scales [S], token_slots [>=T].
    """
    r, h = lora_b.shape[2], _summed(h)
    for rows, slot in _slot_groups(token_slots, y.shape[0]):
        scale = scales[slot].float()
        for c, off, out in _slices(out_slices, r):
            delta = scale * (h[rows, c:c + r] @ lora_b[slot, off:off + out].float().T)
            _add_rows(y, rows, delta, off, out)


def sgmv_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
              out_slices: Sequence[int], tiles: LoRATiles, col_iters: int | None = None) -> None:
    """Fused SGMV's twin: ``sgmv_shrink`` then ``sgmv_expand`` (y [T, O] in place); col_iters is the
    kernel's column chunking, ignored here."""
    sgmv_expand(y, sgmv_shrink(x, lora_a, tiles), lora_b, scales, out_slices, tiles)


def bgmv_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
              out_slices: Sequence[int], token_slots: torch.Tensor, col_iters: int | None = None) -> None:
    """Fused BGMV's twin: ``bgmv_shrink`` then ``bgmv_expand`` (y [T, O] in place); col_iters ignored."""
    bgmv_expand(y, bgmv_shrink(x, lora_a, token_slots), lora_b, scales, out_slices, token_slots)
