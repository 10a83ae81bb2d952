"""bench/refserver: what paged attention buys, measured on the reference server's own engine.

Peer, in the same run and the same process: the same engine with a contiguous KV allocator that
reserves --max-model-len token slots per sequence up front (how servers before PagedAttention
allocated, "Orca (Max)" in the vLLM paper). Both serve one ShareGPT-like synthetic request mix
(log-normal prompt and output lengths, long tails), all requests queued at once, at the same KV
budget. Printed:

  KV waste         reserved-but-unused token slots / reserved slots, averaged over steps
                   (paper: prior systems used 20-38% of KV memory for tokens; paged wastes < 4%)
  throughput       generated tokens/s, paged / contiguous (paper: 2-4x; goal here >= 2x)
  batch            mean sequences per decode step: where the throughput comes from
  copy-on-write    blocks held / blocks the same sequences would hold unshared, for n=4 parallel
                   sampling and beam width 4 (paper: 6-10% and 38-55% saved on ShareGPT)

    python bench/refserver.py [--requests 64] [--kv-cache-mb 8] [--max-model-len 2048] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))

import torch  # noqa: E402

from refserver.block_manager import BlockManager  # noqa: E402
from refserver.config import EngineConfig  # noqa: E402
from refserver.engine import Engine  # noqa: E402
from refserver.sequence import SamplingParams, Sequence  # noqa: E402


class ContiguousBlockManager(BlockManager):
    """The baseline: each sequence gets one fixed, contiguous region of max_model_len slots when
    admitted and keeps it to the end (no sharing, no prefix cache, no growth, no preemption)."""

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int) -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching=False)
        self.per_seq = -(-max_model_len // block_size)
        self.free_regions = list(range(num_blocks // self.per_seq))
        self.held = 0

    @property
    def num_free(self) -> int:
        return len(self.free_regions) * self.per_seq

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        return 0 if seq.block_table else self.per_seq

    def blocks_to_admit(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> int:
        return self.per_seq

    def admit(self, seq: Sequence, cached: list[int]) -> int:
        region = self.free_regions.pop()
        seq.block_table = list(range(region * self.per_seq, (region + 1) * self.per_seq))
        seq.num_computed_tokens = 0
        self.held += self.per_seq
        return 0

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        return []

    def commit(self, seq: Sequence) -> None:
        pass

    def fork(self, parent: Sequence, child: Sequence) -> None:
        raise NotImplementedError("the baseline runs n=1 only")

    def free(self, seq: Sequence) -> None:
        if seq.block_table:
            self.free_regions.append(seq.block_table[0] // self.per_seq)
            self.held -= self.per_seq
        seq.block_table = []
        seq.num_computed_tokens = 0


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    outputs: list[int]


def sharegpt_like(n: int, max_model_len: int, seed: int = 0) -> Workload:
    """Log-normal lengths shaped like ShareGPT's (input mean ~160, output ~340 tokens), scaled by
    half to keep a CPU run short; each request fits max_model_len."""
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(n):
        p = int(min(max(rng.lognormvariate(4.2, 0.9), 4), max_model_len // 2))
        o = int(min(max(rng.lognormvariate(4.8, 0.8), 4), max_model_len - p))
        prompts.append([rng.randrange(256) for _ in range(p)])
        outputs.append(o)
    return Workload(prompts, outputs)


@dataclass
class RunStats:
    seconds: float
    generated: int
    steps: int
    mean_batch: float
    waste: float             # reserved-but-unused slots / reserved slots, averaged over steps
    preemptions: int

    @property
    def throughput(self) -> float:
        return self.generated / self.seconds


def held_and_used(engine: Engine) -> tuple[int, int]:
    """Reserved token slots and slots holding a token's K/V, over the running sequences."""
    bs = engine.cfg.block_size
    seqs = [s for r in engine.scheduler.running for s in r.seqs]
    used = sum(s.num_computed_tokens for s in seqs)
    if isinstance(engine.bm, ContiguousBlockManager):
        return engine.bm.held * bs, used
    return (engine.bm.num_blocks - engine.bm.num_free) * bs, used


def submit(engine: Engine, work: Workload, params: dict | None = None) -> None:
    """Queue the whole workload at once (offline serving, as in the paper's throughput runs)."""
    for i, (prompt, out) in enumerate(zip(work.prompts, work.outputs)):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=out, ignore_eos=True, seed=i, **(params or {})))


def serve(engine: Engine, work: Workload) -> RunStats:
    submit(engine, work)
    reserved = used = steps = batch = 0
    start = time.perf_counter()
    while engine.has_work():
        engine.step()
        held, filled = held_and_used(engine)
        reserved, used = reserved + held, used + filled
        batch += sum(len(r.seqs) for r in engine.scheduler.running)
        steps += 1
    seconds = time.perf_counter() - start
    return RunStats(seconds, engine.stats.generation_tokens, steps, batch / max(steps, 1),
                    1 - used / reserved if reserved else 0.0, engine.scheduler.num_preemptions)


def make_engine(cfg: EngineConfig, contiguous: bool) -> Engine:
    engine = Engine(cfg)
    if contiguous:
        engine.bm = engine.scheduler.bm = ContiguousBlockManager(engine.bm.num_blocks, cfg.block_size,
                                                                  cfg.max_model_len)
    return engine


def cow_saving(cfg: EngineConfig, work: Workload, params: dict) -> float:
    """1 - blocks held / blocks the sequences' tables would hold unshared, summed over steps."""
    engine = Engine(cfg)
    submit(engine, work, params)
    held = unshared = 0
    while engine.has_work():
        engine.step()
        held += engine.bm.num_blocks - engine.bm.num_free
        unshared += sum(len(s.block_table) for r in engine.scheduler.running for s in r.seqs)
    return 1 - held / unshared if unshared else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--kv-cache-mb", type=float, default=8.0, help="the KV budget both engines get")
    ap.add_argument("--max-model-len", type=int, default=2048, help="what the baseline reserves per sequence")
    ap.add_argument("--cow-requests", type=int, default=12)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)     # as the server does: stable on a shared machine
    cfg = EngineConfig(kv_cache_mb=a.kv_cache_mb, max_model_len=a.max_model_len, max_num_seqs=256,
                       max_num_batched_tokens=1024)
    work = sharegpt_like(a.requests, a.max_model_len)
    paged = serve(make_engine(cfg, contiguous=False), work)
    contiguous = serve(make_engine(cfg, contiguous=True), work)
    cow_work = sharegpt_like(a.cow_requests, a.max_model_len // 2, seed=1)
    roomy = EngineConfig(kv_cache_mb=64, max_model_len=a.max_model_len, max_num_seqs=256)
    parallel = cow_saving(roomy, cow_work, {"n": 4})
    beam = cow_saving(roomy, cow_work, {"n": 4, "use_beam_search": True})
    result = {
        "requests": a.requests, "kv_cache_mb": a.kv_cache_mb, "max_model_len": a.max_model_len,
        "prompt_tokens_mean": sum(map(len, work.prompts)) / a.requests,
        "output_tokens_mean": sum(work.outputs) / a.requests,
        "paged": vars(paged) | {"throughput": paged.throughput},
        "contiguous": vars(contiguous) | {"throughput": contiguous.throughput},
        "throughput_ratio": paged.throughput / contiguous.throughput,
        "cow_saved_parallel_n4": parallel, "cow_saved_beam4": beam,
    }
    if a.json:
        print(json.dumps(result))
        return 0
    print(f"workload: {a.requests} ShareGPT-like requests (mean prompt {result['prompt_tokens_mean']:.0f}, "
          f"mean output {result['output_tokens_mean']:.0f} tokens), KV budget {a.kv_cache_mb:g} MiB, "
          f"max_model_len {a.max_model_len}")
    print(f"{'':12}{'tok/s':>9}{'batch':>8}{'KV waste':>10}{'preempt':>9}")
    for name, r in (("paged", paged), ("contiguous", contiguous)):
        print(f"{name:12}{r.throughput:9.0f}{r.mean_batch:8.1f}{r.waste:9.1%}{r.preemptions:9d}")
    ok = "ok" if paged.waste < 0.04 and result["throughput_ratio"] >= 2 else "BELOW GOAL"
    print(f"throughput ratio paged/contiguous: {result['throughput_ratio']:.2f}x (goal >= 2x); "
          f"KV waste {paged.waste:.1%} vs {contiguous.waste:.1%} (goal < 4%): {ok}")
    print(f"copy-on-write saves {parallel:.1%} of KV blocks with n=4 parallel sampling, "
          f"{beam:.1%} with beam width 4")
    return 0


if __name__ == "__main__":
    sys.exit(main())
