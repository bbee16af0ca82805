"""Pure-torch float32 references for the batched LoRA ops (twins of ``lora_triton``).

Same signatures and semantics as the Triton wrappers. They sync with the host
(``tolist``/``unique``), so they serve the CPU path and the tests, never a
CUDA graph. Shapes: T tokens, S slots, R max rank, N = n*R, O = sum(out_slices).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def _segments(seg_starts: torch.Tensor, seg_slots: torch.Tensor) -> Iterator[tuple[int, int, int]]:
    starts = seg_starts.tolist()
    for g, slot in enumerate(seg_slots.tolist()):
        if slot >= 0 and starts[g + 1] > starts[g]:
            yield starts[g], starts[g + 1], slot


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
    """(buf as given, [T, N] part to fill): of a [P, T, N] buffer, partial 0 takes the sum, the rest 0."""
    if buf is None:
        buf = torch.empty((x.shape[0], n), dtype=torch.float32, device=x.device)
    buf.zero_()
    return buf, (buf if buf.dim() == 2 else buf[0])


def _summed(buf: torch.Tensor) -> torch.Tensor:
    return buf if buf.dim() == 2 else buf.sum(0)


def _add_rows(y: torch.Tensor, rows: torch.Tensor | slice, delta: torch.Tensor, off: int, out: int) -> None:
    cols = slice(off, off + out)
    y[rows, cols] = (y[rows, cols].float() + delta).to(y.dtype)


def sgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                max_seg_len: int = 0, buf: torch.Tensor | None = None) -> torch.Tensor:
    """buf[T, N] = per segment ``x[s:e].float() @ lora_a[slot].float().T`` (0 on base rows).

    x [T, H_in], lora_a [S, N, H_in], seg_starts [num_segs+1], seg_slots [num_segs]; max_seg_len unused.
    A buf [P, T, N] takes the result as partials (buf.sum(0)).
    """
    buf, out = _new_buf(x, lora_a.shape[1], buf)
    for s, e, slot in _segments(seg_starts, seg_slots):
        out[s:e] = x[s:e].float() @ lora_a[slot].float().T
    return buf


def bgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor,
                buf: torch.Tensor | None = None) -> torch.Tensor:
    """buf[t] = ``lora_a[token_slots[t]].float() @ x[t].float()`` (0 on base rows).

    x [T, H_in], lora_a [S, N, H_in], token_slots [>=T] -> buf [T, N] (or [P, T, N] partials) float32.
    """
    buf, out = _new_buf(x, lora_a.shape[1], buf)
    for rows, slot in _slot_groups(token_slots, x.shape[0]):
        out[rows] = x[rows].float() @ lora_a[slot].float().T
    return buf


def sgmv_expand(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                out_slices: Sequence[int], seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                max_seg_len: int = 0) -> None:
    """Per segment and slice: ``y[s:e, off:off+out] += scales[slot] * buf[s:e, i*R:(i+1)*R] @ lora_b[slot, off:off+out].T``.

    y [T, O], buf [T, n*R] (or [P, T, n*R] partials) float32, lora_b [S, O, R], scales [S]; max_seg_len unused.
    """
    r, buf = lora_b.shape[2], _summed(buf)
    for s, e, slot in _segments(seg_starts, seg_slots):
        scale = scales[slot].float()
        for c, off, out in _slices(out_slices, r):
            delta = scale * (buf[s:e, c:c + r] @ lora_b[slot, off:off + out].float().T)
            _add_rows(y, slice(s, e), delta, off, out)


def bgmv_expand(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                out_slices: Sequence[int], token_slots: torch.Tensor) -> None:
    """Per token and slice: ``y[t, off:off+out] += scales[s] * lora_b[s, off:off+out].float() @ buf[t, i*R:(i+1)*R]``.

    y [T, O], buf [T, n*R] (or [P, T, n*R] partials) float32, lora_b [S, O, R], scales [S], token_slots [>=T].
    """
    r, buf = lora_b.shape[2], _summed(buf)
    for rows, slot in _slot_groups(token_slots, y.shape[0]):
        scale = scales[slot].float()
        for c, off, out in _slices(out_slices, r):
            delta = scale * (buf[rows, c:c + r] @ lora_b[slot, off:off + out].float().T)
            _add_rows(y, rows, delta, off, out)
