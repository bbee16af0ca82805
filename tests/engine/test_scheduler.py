"""Scheduler and KV-cache bookkeeping, without a model (pure Python)."""

from __future__ import annotations

from loraplex.backend.engine.kv_cache import KVCacheManager
from loraplex.backend.engine.scheduler import Scheduler, SchedulerOutput
from loraplex.backend.engine.sequence import Sequence, Status
from loraplex.backend.sampling_params import SamplingParams
from loraplex.config import SchedulerConfig


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_loras: int = 4, prefix: bool = True,
                   **cfg) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix)
    return Scheduler(SchedulerConfig(**cfg), kv, max_model_len=1024, max_loras=max_loras)


def make_seq(rid: str, n_prompt: int, first: int = 0, adapter: tuple[str, int] | None = None,
             priority: int = 0, max_tokens: int = 8) -> Sequence:
    return Sequence(rid, list(range(first, first + n_prompt)), SamplingParams(max_tokens=max_tokens),
                    max_tokens=max_tokens, adapter_key=adapter, priority=priority)


def run_step(s: Scheduler, token: int = 7) -> SchedulerOutput:
    """One step with a fake model: every sequence that reaches its end samples ``token``."""
    out = s.schedule()
    samplers = [i.seq for i in out.scheduled if i.samples]
    s.advance(out)
    for seq in samplers:
        seq.num_pending -= 1
        seq.output_token_ids.append(token)
        if seq.num_output_tokens >= seq.max_tokens:
            s.finish(seq)
    return out


def test_token_budget_and_chunked_prefill():
    s = make_scheduler(max_num_batched_tokens=10)
    a, b = make_seq("a", 25), make_seq("b", 3)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 10)]
    assert not out.scheduled[0].samples
    s.advance(out)
    out = s.schedule()  # a takes the whole budget again; b waits
    assert out.scheduled[0].num_new_tokens == 10
    s.advance(out)
    out = s.schedule()
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 5), ("b", 3)]
    assert all(i.samples for i in out.scheduled)


def test_decodes_and_prefill_mix_in_one_step():
    s = make_scheduler(max_num_batched_tokens=16)
    s.add(make_seq("a", 4))
    run_step(s)
    s.add(make_seq("b", 30))
    out = s.schedule()
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 15)]


def test_max_num_seqs():
    s = make_scheduler(max_num_seqs=2)
    for i in range(4):
        s.add(make_seq(str(i), 3))
    assert len(s.schedule().scheduled) == 2


def test_chunked_prefill_off_waits_for_budget():
    s = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    s.add(make_seq("long", 12))
    assert s.schedule().is_empty


def test_preemption_by_recompute_and_everything_finishes():
    s = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    seqs = [make_seq(str(i), 6, first=10 * i, max_tokens=6) for i in range(3)]
    for q in seqs:
        s.add(q)
    for _ in range(200):
        if not s.has_unfinished():
            break
        run_step(s)
    assert not s.has_unfinished()
    assert s.num_preemptions > 0
    assert all(q.num_output_tokens == 6 and q.status is Status.FINISHED for q in seqs)
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_priority_policy_orders_waiting_and_preempts_lowest():
    s = make_scheduler(policy="priority", max_num_seqs=1)
    s.add(make_seq("late-low", 3, priority=5))
    s.add(make_seq("urgent", 3, priority=0))
    assert s.schedule().scheduled[0].seq.request_id == "urgent"


def test_adapter_admission_caps_distinct_adapters_per_step():
    s = make_scheduler(max_loras=2)
    for i, name in enumerate(["x", "y", "z", "x"]):
        s.add(make_seq(f"r{i}", 3, adapter=(name, 1)))
    s.add(make_seq("base", 3))
    out = s.schedule()
    ids = [i.seq.request_id for i in out.scheduled]
    assert ids == ["r0", "r1", "r3", "base"]  # z waits for a slot; others go ahead
    assert len({i.seq.adapter_key for i in out.scheduled if i.seq.adapter_key}) == 2


def test_prefix_cache_shares_blocks_and_keys_on_adapter_version():
    s = make_scheduler(block_size=4)
    first = make_seq("a", 10)
    s.add(first)
    run_step(s)
    s.finish(first)
    same = make_seq("b", 10)
    other_adapter = make_seq("c", 10, adapter=("x", 1))
    s.add(same)
    s.add(other_adapter)
    s.schedule()
    assert same.num_cached_tokens == 8  # two full blocks; the last token is always computed
    assert other_adapter.num_cached_tokens == 0
    assert s.kv.prefix_hits == 8


def test_lru_eviction_of_cached_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_seq("a", 4)
    assert kv.allocate(a, 4)
    a.num_computed_tokens = 4
    kv.cache_full_blocks(a)
    kv.free_seq(a)
    assert len(kv.cached) == 2
    b = make_seq("b", 8, first=100)
    assert kv.allocate(b, 8)  # needs all 4 blocks: the cached ones are evicted
    assert not kv.cached
    assert not kv.allocate(make_seq("c", 2, first=200), 2)


def test_allocate_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    seq = make_seq("a", 12)
    assert not kv.allocate(seq, 12)
    assert kv.num_free_blocks == 2 and not seq.block_ids
