"""Token-budget scheduling, admission limits, chunked prefill and preemption, without a model."""

from __future__ import annotations

from pesc_serve.engine.kv_cache import KVCacheManager
from pesc_serve.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from pesc_serve.engine.scheduler import Scheduler


def _req(rid: str, n: int, start: int = 0) -> Request:
    return Request(rid, list(range(start, start + n)), SamplingParams(), max_tokens=64)


def _run_step(s: Scheduler, token: int = 7):
    """Pretend the model ran: advance and append a sampled token to sampling chunks."""
    out = s.schedule()
    samplers = [c.request for c in out.chunks if c.samples]
    s.advance(out)
    for r in samplers:
        r.output_token_ids.append(token)
    return out


def test_chunked_prefill_under_token_budget():
    s = Scheduler(KVCacheManager(64, 4, enable_prefix_caching=False), max_num_seqs=4, max_num_batched_tokens=10)
    r = _req("a", 25)
    s.add_request(r)
    sizes = []
    for _ in range(3):
        out = _run_step(s)
        sizes.append([(c.start, c.num_new_tokens, c.samples) for c in out.chunks])
    assert sizes == [[(0, 10, False)], [(10, 10, False)], [(20, 5, True)]]
    assert r.output_token_ids == [7]
    out = s.schedule()
    assert [(c.start, c.num_new_tokens) for c in out.chunks] == [(25, 1)]


def test_decodes_come_first_and_share_budget_with_new_prefills():
    s = Scheduler(KVCacheManager(64, 4, enable_prefix_caching=False), max_num_seqs=4, max_num_batched_tokens=8)
    a = _req("a", 4)
    s.add_request(a)
    _run_step(s)
    b = _req("b", 20, start=100)
    s.add_request(b)
    out = s.schedule()
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("a", 1), ("b", 7)]
    assert out.num_batched_tokens == 8


def test_max_num_seqs_limits_admission():
    s = Scheduler(KVCacheManager(64, 4, enable_prefix_caching=False), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        s.add_request(_req(str(i), 3, start=10 * i))
    out = s.schedule()
    assert len(out.chunks) == 2 and s.num_running == 2 and s.num_waiting == 1


def test_preemption_when_blocks_run_out_and_recompute_later():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    s = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=100)
    a, b = _req("a", 8), _req("b", 7, start=50)
    s.add_request(a)
    s.add_request(b)
    _run_step(s)  # a: 2 blocks, b: 2 blocks; both sampled a token
    assert kv.num_free_blocks == 0
    out = _run_step(s)  # a needs a 3rd block -> b (admitted last) is preempted
    assert [r.request_id for r in out.preempted] == ["b"]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert b.output_token_ids == [7]  # generated tokens survive preemption
    s.finish(a, FinishReason.STOP)
    out = s.schedule()
    assert [(c.request.request_id, c.start, c.num_new_tokens, c.samples) for c in out.chunks] == [("b", 0, 8, True)]


def test_finish_frees_blocks_from_running_and_waiting():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    s = Scheduler(kv, max_num_seqs=1, max_num_batched_tokens=100)
    a, b = _req("a", 5), _req("b", 5, start=20)
    s.add_request(a)
    s.add_request(b)
    s.schedule()
    s.finish(a, FinishReason.ABORT)
    s.finish(b, FinishReason.ABORT)
    assert kv.num_free_blocks == 8 and not s.has_unfinished()
    assert a.finish_reason == FinishReason.ABORT


def test_prefix_hit_skips_cached_tokens():
    kv = KVCacheManager(num_blocks=32, block_size=4)
    s = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=100)
    a = _req("a", 10)
    s.add_request(a)
    _run_step(s)
    s.finish(a, FinishReason.STOP)
    b = _req("b", 10)
    s.add_request(b)
    out = s.schedule()
    assert [(c.start, c.num_new_tokens) for c in out.chunks] == [(8, 2)]
    assert b.num_cached_tokens == 8
