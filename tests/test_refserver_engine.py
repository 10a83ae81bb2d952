"""The KV block manager, the scheduler and the engine, in process: prefix caching, LRU eviction,
copy-on-write forks, preemption by recompute, chunked prefill, abort, stop strings, beams."""

from __future__ import annotations

import pytest

pytest.importorskip("torch").set_num_threads(1)  # as the server runs: OpenMP spins on shared cores

from refserver import tokenizer  # noqa: E402
from refserver.block_manager import BlockManager  # noqa: E402
from refserver.config import EngineConfig  # noqa: E402
from refserver.engine import Engine  # noqa: E402
from refserver.leaks import LeakSet  # noqa: E402
from refserver.sequence import Request, SamplingParams  # noqa: E402


def computed(bm: BlockManager, tokens: list[int]) -> Request:
    """A request whose prompt is admitted and fully computed (as a step would leave it)."""
    request = Request("r", tokens, SamplingParams())
    seq = request.seqs[0]
    bm.admit(seq, bm.match_prefix(seq))
    bm.append_slots(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)
    return request


def run(engine: Engine, requests: dict[str, tuple[str, SamplingParams]]) -> dict[str, list[str]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, tokenizer.encode(prompt), params)
    texts: dict[str, dict[int, str]] = {}
    while engine.has_work():
        for out in engine.step():
            for c in out.choices:
                texts.setdefault(out.request_id, {}).setdefault(c.index, "")
                texts[out.request_id][c.index] += c.text
    return {rid: [t[i] for i in sorted(t)] for rid, t in texts.items()}


def test_prefix_cache_reuses_full_blocks_of_a_finished_request():
    bm = BlockManager(16, 4)
    first = computed(bm, list(range(10)))  # blocks [0-3] [4-7] + partial [8, 9]
    bm.free(first.seqs[0])
    second = Request("s", list(range(8)) + [42, 43, 44], SamplingParams())
    cached = bm.match_prefix(second.seqs[0])
    assert len(cached) == 2  # the two full blocks, not the partial one
    assert bm.admit(second.seqs[0], cached) == 8
    assert bm.prefix_hits == 8


def test_prefix_match_leaves_one_token_to_compute():
    bm = BlockManager(16, 4)
    bm.free(computed(bm, list(range(8))).seqs[0])
    again = Request("s", list(range(8)), SamplingParams())
    assert len(bm.match_prefix(again.seqs[0])) == 1  # the last token's logits must be computed


def test_free_queue_evicts_least_recently_freed_block_first():
    bm = BlockManager(4, 4)
    a = computed(bm, list(range(4)) + [99])  # 2 blocks, the first one hashed
    b = computed(bm, list(range(100, 104)) + [99])  # 2 more blocks: the pool is full
    assert bm.num_free == 0
    bm.free(a.seqs[0])
    bm.free(b.seqs[0])
    computed(bm, [7] * 6)  # takes 2 blocks: a's, freed first
    assert bm.match_prefix(Request("x", list(range(4)) + [1], SamplingParams()).seqs[0]) == []
    assert len(bm.match_prefix(Request("y", list(range(100, 104)) + [1], SamplingParams()).seqs[0])) == 1


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    bm = BlockManager(8, 4)
    parent = computed(bm, list(range(6))).seqs[0]  # a full block and a half-full one
    child = parent.fork(1, None)
    bm.fork(parent, child)
    assert [bm.blocks[b].ref_count for b in parent.block_table] == [2, 2]
    child.token_ids.append(7)
    assert bm.blocks_needed(child, 1) == 1
    copies = bm.append_slots(child, 1)
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]  # the full block stays shared
    assert bm.blocks[parent.block_table[1]].ref_count == 1  # the parent writes in place
    assert bm.append_slots(parent, 1) == []


def small_engine(**kw) -> Engine:
    return Engine(EngineConfig(max_model_len=256, **kw))


def test_preemption_recomputes_to_the_same_greedy_output():
    greedy = SamplingParams(max_tokens=150, temperature=0.0)
    requests = {f"r{i}": (f"prompt number {i} " * 4, greedy) for i in range(6)}
    roomy = run(small_engine(kv_cache_mb=8), requests)
    tight = small_engine(kv_cache_mb=0.75)  # 24 blocks: 6 requests need ~72
    squeezed = run(tight, requests)
    assert tight.scheduler.num_preemptions > 0
    assert squeezed == roomy
    assert tight.bm.usage == 0.0


def test_chunked_prefill_gives_the_same_output_as_whole_prefill():
    params = SamplingParams(max_tokens=20, temperature=0.0)
    prompt = "a long prompt that does not fit one step " * 4
    whole = run(small_engine(), {"r": (prompt, params)})
    chunked_engine = small_engine(max_num_batched_tokens=32)
    chunked = run(chunked_engine, {"r": (prompt, params)})
    assert chunked == whole
    assert chunked_engine.stats.steps > 20 + 1  # the prompt alone took several steps


def test_seeded_sampling_repeats_and_differs_between_seeds():
    def sampled(seed):
        return run(small_engine(), {"r": ("seed me", SamplingParams(max_tokens=30, seed=seed))})["r"]

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)


def test_parallel_sampling_forks_share_the_prompt_blocks():
    engine = small_engine()
    engine.add_request("r", tokenizer.encode("x" * 95), SamplingParams(n=4, max_tokens=40, seed=1))
    engine.step()  # prefill, then the fork into 4 sequences
    request = engine.requests["r"]
    assert len(request.seqs) == 4
    held = engine.bm.num_blocks - engine.bm.num_free
    assert held == 6  # 96 tokens = 6 blocks, once, not 4 times
    engine.step()  # each fork writes its own partial block
    assert engine.bm.num_blocks - engine.bm.num_free == 6 + 4
    while engine.has_work():
        engine.step()
    assert engine.bm.usage == 0.0


def test_beam_search_returns_n_distinct_beams_best_first():
    engine = small_engine()
    out = run(engine, {"r": ("beams", SamplingParams(n=4, max_tokens=12, use_beam_search=True))})["r"]
    assert len(out) == 4 and len(set(out)) == 4
    assert engine.bm.usage == 0.0


def test_stop_string_ends_the_choice_before_the_stop():
    engine = small_engine()
    free_text = run(engine, {"a": ("stop test", SamplingParams(max_tokens=40, temperature=0.0))})["a"][0]
    stop = free_text[10:12]
    cut = run(engine, {"b": ("stop test", SamplingParams(max_tokens=40, temperature=0.0, stop=(stop,)))})[
        "b"
    ][0]
    assert cut == free_text[: free_text.index(stop)]


def test_abort_frees_blocks_unless_the_kv_abort_leak_keeps_them():
    for leaks, expect_free in ((None, True), (LeakSet(("kv-abort",), 1.0), False)):
        engine = Engine(EngineConfig(max_model_len=256), leaks=leaks)
        # ignore_eos: a sampled end-of-text token would finish it before the abort (~3% of runs)
        engine.add_request(
            "r", tokenizer.encode("abort me " * 10), SamplingParams(max_tokens=100, ignore_eos=True)
        )
        for _ in range(3):
            engine.step()
        assert engine.bm.usage > 0
        out = engine.abort("r")
        assert out.finished and out.choices[0].finish_reason == "abort"
        assert (engine.bm.usage == 0.0) is expect_free
        assert not engine.has_work()


def test_requests_that_can_never_fit_are_refused():
    engine = Engine(EngineConfig(max_model_len=128, kv_cache_mb=0.25))  # 8 blocks of 16 tokens
    with pytest.raises(ValueError, match="maximum context length"):
        engine.check_request([1] * 100, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.check_request([1] * 20, SamplingParams(max_tokens=100, n=4))
