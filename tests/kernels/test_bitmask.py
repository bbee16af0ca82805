"""The grammar-bitmask op: the Triton kernel (TRITON_INTERPRET=1 on CPU) against the torch reference
and xgrammar's own kernel, over ragged vocabularies, masks shorter than the vocabulary, any row set
and float dtypes; on CUDA also inside a CUDA graph."""

from __future__ import annotations

import pytest
import torch
import xgrammar as xgr

from loraplex.kernels.bitmask import apply_token_bitmask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(batch: int, vocab: int, words: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=gen).to(dtype).to(DEVICE)
    bitmask = torch.randint(-2**31, 2**31 - 1, (batch, words), dtype=torch.int32, generator=gen).to(DEVICE)
    return logits, bitmask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "vocab", "words", "rows"), [
    (1, 32, 1, [0]), (4, 70, 3, [1, 3]), (5, 100, 3, [0, 1, 2, 3, 4]), (6, 4100, 129, [5, 0, 2]),
    (3, 272, 2, [2]),  # the mask covers 64 tokens of 272: the rest is forbidden
])
def test_triton_matches_torch_and_xgrammar(batch: int, vocab: int, words: int, rows: list[int],
                                           dtype: torch.dtype) -> None:
    logits, bitmask = case(batch, vocab, words, dtype, seed=batch * vocab)
    ours, ref = logits.clone(), logits.clone()
    apply_token_bitmask(ours, bitmask, rows, backend="triton")
    apply_token_bitmask(ref, bitmask, rows, backend="torch")
    assert torch.equal(ours, ref)
    untouched = [r for r in range(batch) if r not in rows]
    assert torch.equal(ours[untouched], logits[untouched])
    for r in rows:  # exactly the cleared bits (and everything past the mask) became -inf
        bits = [(int(bitmask[r, j // 32]) >> (j % 32)) & 1 if j < 32 * words else 0 for j in range(vocab)]
        assert [bool(b) for b in bits] == (ours[r] != float("-inf")).tolist()
    covered = min(vocab, 32 * words)
    part = logits.float().cpu()[:, :covered].contiguous()  # xgrammar's CPU kernel, on the covered tokens
    xgr.apply_token_bitmask_inplace(part, bitmask.cpu(), indices=rows, vocab_size=covered)
    assert torch.equal(ours[:, :covered].float().cpu(), part)


@pytest.mark.parametrize(("vocab", "words", "mask_vocab"), [(288, 9, 265), (300, 9, 265), (70, 3, 70), (96, 3, 33)])
def test_padding_bits_past_the_mask_vocabulary_are_forbidden(vocab: int, words: int, mask_vocab: int) -> None:
    """The last word's bits past ``vocab=`` are padding (xgrammar leaves whatever they held, and the
    engine's reused buffer holds old masks): set to 1 here, they must still forbid their ids."""
    logits, _ = case(3, vocab, words, torch.float32, seed=vocab + mask_vocab)
    bitmask = torch.full((3, words), -1, dtype=torch.int32, device=DEVICE)  # every bit allowed
    bitmask[1, 0] = 0b1010  # row 1: ids 1 and 3 only, then the rest of the allowed words
    ours, ref = logits.clone(), logits.clone()
    apply_token_bitmask(ours, bitmask, [0, 1], vocab=mask_vocab, backend="triton")
    apply_token_bitmask(ref, bitmask, [0, 1], vocab=mask_vocab, backend="torch")
    assert torch.equal(ours, ref)
    for r in (0, 1):
        allowed = (ours[r] != float("-inf")).nonzero().flatten().tolist()
        assert max(allowed) == mask_vocab - 1
        expect = [j for j in range(mask_vocab) if r == 0 or j >= 32 or j in (1, 3)]
        assert allowed == expect
    assert torch.equal(ours[2], logits[2])


def test_a_tensor_of_rows_and_an_empty_row_set() -> None:
    logits, bitmask = case(4, 96, 3, torch.float32, seed=1)
    ours, ref = logits.clone(), logits.clone()
    apply_token_bitmask(ours, bitmask, torch.tensor([3, 1], device=DEVICE), backend="triton")
    apply_token_bitmask(ref, bitmask, [3, 1], backend="torch")
    assert torch.equal(ours, ref)
    same = logits.clone()
    apply_token_bitmask(same, bitmask, [], backend="triton")
    assert torch.equal(same, logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_vocabulary_in_a_cuda_graph() -> None:
    logits, bitmask = case(32, 151936, 4748, torch.bfloat16, seed=3)
    rows = torch.arange(0, 32, 2, device="cuda", dtype=torch.int32)
    ref = logits.clone()
    apply_token_bitmask(ref, bitmask, rows, backend="torch")
    work = logits.clone()
    apply_token_bitmask(work, bitmask, rows)  # compile outside the capture
    work.copy_(logits)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        apply_token_bitmask(work, bitmask, rows)
    work.copy_(logits)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(work, ref)
