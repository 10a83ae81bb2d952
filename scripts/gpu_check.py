"""`make gpu-check`: the GPU checks of leakhunt and its reference server, in one command, on a GPU
machine with no network. Installs the wheels `make gpu-wheels` downloaded (carried beside the
tree) and leakhunt itself into a private folder, then runs, each against real processes:

  kernel     the Triton decode kernel against torch's gather on the GPU (bf16)          bar
  api        completions and streamed chat through the openai client, on CUDA          bar
  none       `leakhunt watch` on the server under load, no leak: leak false              bar
  pinned     --leak pinned: leak true, top class pinned, slope within 20% of the rate   bar
  device     --leak device: NVML's series says leak, RSS does not                       bar
  kv-abort   --leak kv-abort: KV usage stays up after the load; RSS and device flat
  report     `leakhunt report` of the device recording has its Device memory section
  callers    trace-mmap with cuda-gdb on the pinned leak: the CUDA libraries hold it
  bench      bench/gpu.py: paged (Triton) >= 2x contiguous throughput at one KV budget  bar

and prints a summary (also written to OUT/summary.json; OUT is $OUT when set, else gpu-check-out/).
Exit 0 when every bar passed, 1 when one failed, 2 when it cannot run here (no CUDA, no wheels).

    python3 scripts/gpu_check.py [--wheels gpu-wheels] [--checks all] [--duration 30] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import gpu_scenarios as sc  # noqa: E402

CHECKS = ("kernel", "api", "none", "pinned", "device", "kv-abort", "report", "callers", "bench")
#: What the checks import in the children: their absence after the install is the first line printed.
NEEDED = (
    "torch",
    "fastapi",
    "uvicorn",
    "httpx",
    "openai",
    "pygdbmi",
    "elftools",
    "pynvml",
    "leakhunt",
    "refserver",
)


def log(line: str) -> None:
    """Progress goes to stderr: stdout is the summary (or its JSON)."""
    print(line, file=sys.stderr, flush=True)


class CannotRun(Exception):
    """gpu-check cannot run on this machine: one line, exit 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", default=str(ROOT / "gpu-wheels"), help="the folder `make gpu-wheels` filled")
    ap.add_argument("--site", default=None, help="where to install them (default: a fresh temporary folder)")
    ap.add_argument("--skip-install", action="store_true", help="use what this Python already imports")
    ap.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(ROOT / "gpu-check-out"),
        help="recordings, logs and summary.json (default: $OUT, else gpu-check-out/)",
    )
    ap.add_argument(
        "--checks", default="all", help=f"comma-separated, from: {', '.join(CHECKS)} (default: all)"
    )
    ap.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: rehearse the scenarios that need no GPU (tests do; the bars are for cuda)",
    )
    ap.add_argument("--duration", type=float, default=30.0, help="seconds each watch samples (default 30)")
    ap.add_argument(
        "--warmup", type=float, default=8.0, help="seconds of load before a watch starts (default 8)"
    )
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    a = ap.parse_args(argv)
    names = CHECKS if a.checks == "all" else tuple(c.strip() for c in a.checks.split(",") if c.strip())
    unknown = sorted(set(names) - set(CHECKS))
    if unknown or not names:
        ap.error(f"--checks: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CHECKS)}")
    if a.duration < 10 or a.warmup < 0:
        # watch ignores its first 3 s, and a verdict needs 6 samples (1 s apart) after that.
        ap.error("--duration must be at least 10 s and --warmup >= 0")
    a.checks = names
    return a


def torch_status(device: str) -> str:
    """One line on torch and the GPU; raises CannotRun when the checks need CUDA and there is none."""
    try:
        import torch
    except ImportError as e:
        raise CannotRun(f"this Python ({sys.executable}) has no torch: {e}") from None
    if device == "cpu":
        return f"torch {torch.__version__} on the CPU (rehearsal: the GPU bars are not checked)"
    if not torch.cuda.is_available():
        raise CannotRun(
            f"no CUDA device here (torch {torch.__version__}, CUDA {torch.version.cuda}): "
            "gpu-check runs on the GPU machine; --device cpu rehearses the rest"
        )
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name()}, "
        f"{torch.cuda.device_count()} device(s)"
    )


def install(wheels: Path, site: Path) -> list[str]:
    """The carried wheels, then leakhunt (and the reference server it ships) without dependencies,
    into ``site``; returns notes. Offline: --no-index everywhere."""
    notes = []
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-index",
        "--disable-pip-version-check",
        "--no-cache-dir",
        "--target",
        str(site),
    ]
    requirements = wheels / "requirements.txt"
    if not requirements.is_file():
        raise CannotRun(
            f"{wheels}/requirements.txt not found: run `make gpu-wheels` where there is network "
            "and carry that folder (or --skip-install where everything is installed)"
        )
    cp = subprocess.run(
        pip + ["--find-links", str(wheels), "-r", str(requirements)], capture_output=True, text=True
    )
    if cp.returncode != 0:
        raise CannotRun(f"installing the carried wheels failed: {cp.stderr.strip()[-800:]}")
    # --no-build-isolation: the build uses this Python's setuptools, nothing is fetched.
    cp = subprocess.run(
        pip + ["--no-deps", "--no-build-isolation", str(ROOT)], capture_output=True, text=True
    )
    if cp.returncode != 0:
        why = cp.stderr.strip().splitlines()[-1][:300] if cp.stderr.strip() else f"pip exited {cp.returncode}"
        notes.append(f"leakhunt did not build as a package here (it runs from the checkout instead): {why}")
    return notes


def child_env(site: Path | None) -> dict:
    """The environment of every child: the private site first, the checkout as a fallback."""
    paths = ([str(site)] if site else []) + [str(ROOT), str(ROOT / "fixtures")]
    old = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths + ([old] if old else [])),
        "PYTHONUNBUFFERED": "1",
    }


def importable(env: dict) -> dict[str, str]:
    """Which of NEEDED the children import, and from where (or why not)."""
    code = (
        "import importlib, json, sys\nout = {}\nfor n in sys.argv[1:]:\n    try:\n"
        "        m = importlib.import_module(n); out[n] = getattr(m, '__version__', '') or 'ok'\n"
        "    except Exception as e:\n        out[n] = 'MISSING: ' + str(e).splitlines()[0][:120]\n"
        "print(json.dumps(out))"
    )
    cp = subprocess.run(
        [sys.executable, "-c", code, *NEEDED], capture_output=True, text=True, env=env, timeout=300
    )
    return json.loads(cp.stdout) if cp.returncode == 0 else {"python": f"failed: {cp.stderr[-300:]}"}


def run_bench(setup: sc.Setup) -> sc.Outcome:
    if setup.device != "cuda":
        return sc.skipped("bench/gpu", True, "needs CUDA")
    cp = subprocess.run(
        [setup.python, str(ROOT / "bench" / "gpu.py"), "--json"],
        capture_output=True,
        text=True,
        env=setup.env,
        timeout=900,
    )
    if cp.returncode != 0:
        return sc.outcome("bench/gpu", True, False, f"exit {cp.returncode}: {cp.stderr.strip()[-600:]}")
    result = json.loads(cp.stdout.strip().splitlines()[-1])
    (setup.out / "bench-gpu.json").write_text(json.dumps(result, indent=1))
    s = result["serving"]
    kernels = "; ".join(
        f"{k['shape']}: SDPA/Triton {k['sdpa_over_triton']:.2f}x, gather/Triton "
        f"{k['gather_over_triton']:.2f}x"
        for k in result["decode_kernel"]
    )
    return sc.outcome(
        "bench/gpu",
        True,
        s["throughput_ratio"] >= 2.0,
        f"paged/contiguous {s['throughput_ratio']:.2f}x tok/s (bar 2x), max concurrent "
        f"{s['paged']['max_batch']} vs {s['contiguous']['max_batch']}, KV waste "
        f"{s['paged']['waste']:.1%} vs {s['contiguous']['waste']:.1%}; {kernels}",
        throughput_ratio=s["throughput_ratio"],
    )


def run_checks(setup: sc.Setup, names: tuple[str, ...]) -> list[sc.Outcome]:
    outcomes: list[sc.Outcome] = []
    device_recording = None
    steps = {
        "kernel": sc.check_kernel,
        "api": sc.check_api,
        "none": sc.check_none,
        "pinned": sc.check_pinned,
        "device": sc.check_device,
        "kv-abort": sc.check_kv_abort,
        "callers": sc.check_callers,
        "bench": run_bench,
    }
    for name in names:
        began = time.monotonic()
        log(f"· {name} …")
        try:
            if name == "report":
                result = sc.check_report(setup, device_recording)
            else:
                result = steps[name](setup)
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others' results
            result = sc.outcome(
                name,
                name in ("kernel", "api", "none", "pinned", "device", "bench"),
                False,
                f"{type(e).__name__}: {e}",
            )
        if name == "device" and result.status == "pass":
            device_recording = result.data.get("recording")
        result.data["seconds"] = round(time.monotonic() - began, 1)
        log(f"  {result.status.upper():4} {result.detail}")
        outcomes.append(result)
    return outcomes


def summary(outcomes: list[sc.Outcome], header: list[str]) -> tuple[str, int]:
    failed_bars = [o for o in outcomes if o.bar and o.status == "fail"]
    lines = ["", "gpu-check summary", *[f"  {h}" for h in header]]
    for o in outcomes:
        lines.append(f"  {o.status.upper():4} {'bar ' if o.bar else 'also'} {o.name:28} {o.detail}")
    unrun = [o.name for o in outcomes if o.status == "skip"]
    bars_unrun = any(o.bar and o.status == "skip" for o in outcomes)
    verdict = (
        f"{len(failed_bars)} bar(s) failed: " + ", ".join(o.name for o in failed_bars)
        if failed_bars
        else "every bar that ran passed"
        if bars_unrun
        else "every bar passed"
    )
    lines.append(f"  {verdict}" + (f"; not run: {', '.join(unrun)}" if unrun else ""))
    return "\n".join(lines), 1 if failed_bars else 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        header = [
            f"Python {platform.python_version()} ({sys.executable}) on {platform.node()}",
            torch_status(a.device),
        ]
        site = None
        if not a.skip_install:
            site = Path(a.site or tempfile.mkdtemp(prefix="leakhunt-gpu-site-"))
            header += install(Path(a.wheels), site)
        env = child_env(site)
        found = importable(env)
        missing = {n: v for n, v in found.items() if str(v).startswith(("MISSING", "failed"))}
        header.append("imports: " + ", ".join(f"{n} {v}" for n, v in found.items() if n not in missing))
        if missing:
            header.append("missing: " + "; ".join(f"{n}: {v}" for n, v in missing.items()))
        if any(n in missing for n in ("leakhunt", "refserver", "fastapi", "uvicorn", "torch")):
            raise CannotRun("the server or leakhunt cannot be imported: " + "; ".join(missing.values()))
    except CannotRun as e:
        print(f"gpu-check: {e}", file=sys.stderr)
        return 2
    for line in header:
        log(line)
    sys.path[:0] = [p for p in env["PYTHONPATH"].split(os.pathsep) if p]  # this process imports them too
    setup = sc.Setup(sys.executable, env, a.device, out, a.duration, a.warmup)
    outcomes = run_checks(setup, a.checks)
    text, code = summary(outcomes, header)
    document = {
        "device": a.device,
        "header": header,
        "exit_code": code,
        "checks": [
            {"name": o.name, "bar": o.bar, "status": o.status, "detail": o.detail, **o.data} for o in outcomes
        ],
    }
    (out / "summary.json").write_text(json.dumps(document, indent=1, default=str))
    print(json.dumps(document, default=str) if a.json else text)
    return code


if __name__ == "__main__":
    sys.exit(main())
