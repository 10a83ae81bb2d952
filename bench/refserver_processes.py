"""bench/refserver_processes: what splitting the reference server into an API process and an engine
process (`--processes api,engine`) costs, against the one-process server measured in the same run.

Each round starts one fresh server of each layout, in alternating order, and drives it with the
same closed-loop load (the in-repo load generator, the same seed); the best round of each layout
is kept, as noise on shared cores only ever slows a run down. Printed: requests/s, output
tokens/s and median latency of each, the two-process/one-process ratios, the memory of each (the
two-process tree with shared pages counted once, PSS), and how the messages crossed (the /dev/shm
rings, or the socket when a ring was full).

    .venv/bin/python bench/refserver_processes.py [--requests 400] [--concurrency 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ holds scripts named like packages (refserver): off the path, or they shadow them.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from leakhunt.proc.sampler import Sampler  # noqa: E402
from leakhunt.proc.target import open_target  # noqa: E402
from leakhunt.proc.tree import tree_totals  # noqa: E402

LAYOUTS = ("api", "api,engine")


def one_run(layout: str, requests: int, concurrency: int, seed: int) -> dict:
    from refserver import loadgen
    from refserver.launch import launch

    with launch(processes=layout, args=["--kv-cache-mb", "16"]) as server:
        shape = dict(
            prompt_len=loadgen.LengthDist.parse("16-64"), max_tokens=loadgen.LengthDist.parse("16-64")
        )
        loadgen.run(
            loadgen.LoadConfig(
                url=server.url, duration=None, requests=50, concurrency=concurrency, seed=seed + 1000, **shape
            )
        )  # warm-up
        report = loadgen.run(
            loadgen.LoadConfig(
                url=server.url, duration=None, requests=requests, concurrency=concurrency, seed=seed, **shape
            )
        )
        assert report.failed == 0, report.errors
        pids = [server.pid, *server.children()]
        snapshots = [Sampler(open_target(pid)).take().snapshot for pid in pids]
        totals = tree_totals(snapshots)
        links = server.health().get("engine_process", {})
    return {
        "req_s": report.request_throughput,
        "tok_s": report.output_throughput,
        "p50_ms": report.latency_ms["p50"],
        "rss": totals.rss,
        "pss": totals.pss,
        "processes": len(pids),
        "via_shm": links.get("messages_via_shm"),
        "via_socket": links.get("messages_via_socket"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    try:
        import refserver  # noqa: F401
    except ImportError:
        print("refserver is not installed (pip install -e '.[refserver]')")
        return 2
    best: dict[str, dict] = {}
    for r in range(a.rounds):
        order = LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]
        for layout in order:
            run = one_run(layout, a.requests, a.concurrency, seed=r)
            print(
                f"round {r + 1} {layout:<11} {run['req_s']:7.2f} req/s {run['tok_s']:8.1f} tok/s "
                f"p50 {run['p50_ms']:7.1f} ms",
                flush=True,
            )
            if layout not in best or run["req_s"] > best[layout]["req_s"]:
                best[layout] = run
    one, two = best["api"], best["api,engine"]
    print()
    print(f"{'layout':<11} {'req/s':>8} {'tok/s':>9} {'p50 ms':>8} {'memory (tree RSS)':>18} {'PSS':>10}")
    for layout in LAYOUTS:
        b = best[layout]
        print(
            f"{layout:<11} {b['req_s']:8.2f} {b['tok_s']:9.1f} {b['p50_ms']:8.1f} "
            f"{b['rss'] / 2**20:14.1f} MiB {b['pss'] / 2**20:6.1f} MiB"
        )
    print()
    print(
        f"throughput ratio (api,engine / api): {two['req_s'] / one['req_s']:.2f}x requests/s, "
        f"{two['tok_s'] / one['tok_s']:.2f}x tokens/s; median latency {two['p50_ms'] / one['p50_ms']:.2f}x"
    )
    print(
        f"memory ratio (api,engine / api): {two['rss'] / one['rss']:.2f}x RSS counted once, "
        f"{two['pss'] / one['pss']:.2f}x PSS ({two['processes']} processes)"
    )
    print(
        f"messages between the processes: {two['via_shm']} through the /dev/shm rings, "
        f"{two['via_socket']} whole over the socket (a ring was full)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
