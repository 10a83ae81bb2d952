"""bench/gpu: the reference server's paged attention on CUDA, against its peers in the same run.

Two measurements, ratios from one run:

  serving       the engine with the paged KV cache and the Triton decode kernel, against the same
                engine with a contiguous allocator that reserves --max-model-len slots per sequence
                (bench/refserver.py's baseline), at the same KV budget, on one ShareGPT-like mix
                queued at once: throughput ratio (goal >= 2x), KV waste (reserved but unused
                slots; paged goal < 4%), mean and maximum concurrent sequences
  decode kernel the Triton kernel over scattered block tables, against torch's
                scaled_dot_product_attention over contiguous K/V of the same shapes (and torch's
                gather implementation), for the server's model and a Llama-8B-like head shape;
                the outputs are compared too (bf16: within 2e-2)

Without CUDA it says so in one line and exits 0; `--device cpu` runs the serving part with torch
attention (KV waste and concurrency are the same bookkeeping; throughput is the CPU's).

    python bench/gpu.py [--requests 256] [--kv-cache-mb 32] [--max-model-len 2048] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _peer_bench():
    """bench/refserver.py, whose contiguous baseline and workload this benchmark shares (loaded by
    path: its module name would clash with the refserver package)."""
    spec = importlib.util.spec_from_file_location("bench_refserver", ROOT / "bench" / "refserver.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Serving:
    seconds: float
    generated: int
    steps: int
    mean_batch: float
    max_batch: int
    waste: float
    preemptions: int

    @property
    def throughput(self) -> float:
        return self.generated / self.seconds


def serve(peer, engine, work) -> Serving:
    """peer.serve's loop, also keeping the largest batch, with the device synchronised at the end."""
    peer.submit(engine, work)
    reserved = used = steps = batch = biggest = 0
    start = time.perf_counter()
    while engine.has_work():
        engine.step()
        held, filled = peer.held_and_used(engine)
        reserved, used = reserved + held, used + filled
        running = sum(len(r.seqs) for r in engine.scheduler.running)
        batch, biggest, steps = batch + running, max(biggest, running), steps + 1
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return Serving(
        time.perf_counter() - start,
        engine.stats.generation_tokens,
        steps,
        batch / max(steps, 1),
        biggest,
        1 - used / reserved if reserved else 0.0,
        engine.scheduler.num_preemptions,
    )


def serving(a, device: str) -> dict:
    from refserver.config import EngineConfig

    peer = _peer_bench()
    cfg = EngineConfig(
        device=device,
        attention="triton" if device == "cuda" else "torch",
        kv_cache_mb=a.kv_cache_mb,
        max_model_len=a.max_model_len,
        max_num_seqs=1024,
        max_num_batched_tokens=4096,
    )
    work = peer.sharegpt_like(a.requests, a.max_model_len)
    # A small run of each first: Triton compiles its kernel and cuBLAS picks its algorithms there.
    for contiguous in (False, True):
        serve(peer, peer.make_engine(cfg, contiguous), peer.sharegpt_like(8, a.max_model_len, seed=9))
    runs: dict[bool, list[Serving]] = {False: [], True: []}
    for _ in range(a.rounds):
        for contiguous in (False, True):
            runs[contiguous].append(serve(peer, peer.make_engine(cfg, contiguous), work))
    paged, contiguous = (max(runs[c], key=lambda r: r.throughput) for c in (False, True))
    return {
        "device": device,
        "attention": cfg.attention,
        "requests": a.requests,
        "kv_cache_mb": a.kv_cache_mb,
        "max_model_len": a.max_model_len,
        "paged": asdict(paged) | {"throughput": paged.throughput},
        "contiguous": asdict(contiguous) | {"throughput": contiguous.throughput},
        "throughput_ratio": paged.throughput / contiguous.throughput,
        "max_concurrent_ratio": paged.max_batch / max(contiguous.max_batch, 1),
    }


#: (name, batch, query heads, kv heads, head dim, context): the server's model, and Llama-3-8B's heads.
KERNEL_SHAPES = (("refserver", 64, 8, 2, 32, 1024), ("llama-8b-like", 64, 32, 8, 128, 2048))
BLOCK = 16


def _time_ms(fn, iters: int = 50) -> float:
    """Median of CUDA-event timings after a warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def decode_kernel(name: str, b: int, h: int, kvh: int, d: int, ctx: int) -> dict:
    from refserver import triton_attention
    from refserver.attention import decode_attention, gather_kv

    gen = torch.Generator(device="cuda").manual_seed(0)
    blocks_per_seq = ctx // BLOCK
    num_blocks = b * blocks_per_seq
    as_bf16 = dict(dtype=torch.bfloat16, device="cuda")
    k_cache = torch.randn(num_blocks, BLOCK, kvh, d, generator=gen, **as_bf16)
    v_cache = torch.randn(num_blocks, BLOCK, kvh, d, generator=gen, **as_bf16)
    # Scattered tables: every sequence's blocks are spread over the pool, as after hours of serving.
    tables = torch.randperm(num_blocks, generator=gen, device="cuda").view(b, blocks_per_seq)
    lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(b, h, d, generator=gen, **as_bf16)
    scale = d**-0.5
    k, v = gather_kv(k_cache, tables).contiguous(), gather_kv(v_cache, tables).contiguous()  # [B, KVH, L, D]
    q4 = q.unsqueeze(2)  # [B, H, 1, D]

    def paged():
        return triton_attention.paged_decode(q, k_cache, v_cache, tables, lens, scale)

    def sdpa():
        return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

    def gather():
        return decode_attention(q, k_cache, v_cache, tables, lens, scale)

    diff = (paged().float() - sdpa().squeeze(2).float()).abs().max().item()
    t_paged, t_sdpa, t_gather = _time_ms(paged), _time_ms(sdpa), _time_ms(gather)
    kv_bytes = 2 * b * ctx * kvh * d * 2
    return {
        "shape": name,
        "batch": b,
        "heads": h,
        "kv_heads": kvh,
        "head_dim": d,
        "context": ctx,
        "triton_ms": t_paged,
        "sdpa_ms": t_sdpa,
        "gather_ms": t_gather,
        "max_abs_diff": diff,
        "sdpa_over_triton": t_sdpa / t_paged,
        "gather_over_triton": t_gather / t_paged,
        "triton_kv_gb_per_s": kv_bytes / t_paged / 1e6,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--kv-cache-mb", type=float, default=32.0, help="the KV budget both engines get")
    ap.add_argument("--max-model-len", type=int, default=2048, help="what the baseline reserves per sequence")
    ap.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds of both engines; the best counts"
    )
    ap.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: the serving part only, with torch attention (no kernel timings)",
    )
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print(
            f"bench/gpu: no CUDA device here (torch {torch.__version__}): nothing measured; run it on a GPU "
            "machine (make gpu-check), or --device cpu for the KV bookkeeping alone"
        )
        return 0
    torch.manual_seed(0)
    torch.set_num_threads(1)
    result = {
        "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
        "torch": torch.__version__,
        "serving": serving(a, a.device),
        "decode_kernel": [decode_kernel(*shape) for shape in KERNEL_SHAPES] if a.device == "cuda" else [],
    }
    s = result["serving"]
    result["goal_met"] = s["throughput_ratio"] >= 2 and s["paged"]["waste"] < 0.04
    if a.json:
        print(json.dumps(result))
        return 0
    _print(result)
    return 0


def _print(result: dict) -> None:
    s = result["serving"]
    print(
        f"{result['gpu'] or 'CPU'} · torch {result['torch']} · {s['requests']} ShareGPT-like requests, "
        f"KV budget {s['kv_cache_mb']:g} MiB, max_model_len {s['max_model_len']}, attention {s['attention']}"
    )
    print(f"{'':12}{'tok/s':>10}{'mean batch':>12}{'max batch':>11}{'KV waste':>10}{'preempt':>9}")
    for name in ("paged", "contiguous"):
        r = s[name]
        print(
            f"{name:12}{r['throughput']:10.0f}{r['mean_batch']:12.1f}{r['max_batch']:11d}{r['waste']:9.1%}"
            f"{r['preemptions']:9d}"
        )
    print(
        f"throughput ratio paged/contiguous {s['throughput_ratio']:.2f}x (goal >= 2x), max concurrent sequences "
        f"{s['max_concurrent_ratio']:.1f}x, KV waste {s['paged']['waste']:.1%} vs {s['contiguous']['waste']:.1%} "
        f"(goal < 4%): {'ok' if result['goal_met'] else 'BELOW GOAL'}"
    )
    for k in result["decode_kernel"]:
        print(
            f"decode kernel, {k['shape']} (B={k['batch']}, H={k['heads']}/{k['kv_heads']}, D={k['head_dim']}, "
            f"context {k['context']}): Triton paged {k['triton_ms'] * 1000:.0f} µs "
            f"({k['triton_kv_gb_per_s']:.0f} GB/s of KV), SDPA contiguous {k['sdpa_ms'] * 1000:.0f} µs "
            f"({k['sdpa_over_triton']:.2f}x the Triton time), torch gather {k['gather_ms'] * 1000:.0f} µs "
            f"({k['gather_over_triton']:.2f}x); max |diff| vs SDPA {k['max_abs_diff']:.1e}"
        )


if __name__ == "__main__":
    sys.exit(main())
