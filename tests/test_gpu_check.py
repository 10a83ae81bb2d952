"""`make gpu-wheels` and `make gpu-check` as far as a machine without a GPU can take them: the
wheel list comes from pyproject minus what the GPU image has and resolves offline for CPython 3.12,
gpu-check refuses clearly where it cannot run, and its CPU rehearsal drives the real server, load
generator and leakhunt through the same code the GPU run uses. bench/gpu says it needs CUDA and
its KV bookkeeping runs on the CPU.
"""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_wheels  # noqa: E402

SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _run(*args, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw
    )


def test_wheel_list_is_pyproject_minus_the_gpu_image():
    names = {gpu_wheels._name(r) for r in gpu_wheels.wanted()}
    assert {"fastapi", "uvicorn", "openai", "pygdbmi", "pyelftools"} <= names
    assert not names & gpu_wheels.IMAGE_HAS  # torch above all: the image's CUDA build is kept
    assert "torch" not in names and "nvidia-ml-py" not in names


def test_pins_come_from_the_interpreter_that_ran_the_tests():
    pins = gpu_wheels.pinned(gpu_wheels.wanted(), sys.executable)
    import fastapi

    assert f"fastapi=={fastapi.__version__}" in pins
    assert gpu_wheels.pinned(["fastapi>=0.100"], "/nonexistent/python") == ["fastapi>=0.100"]


def _python312() -> str | None:
    """A Python 3.12 that runs (pyenv's shims exist for versions that are not activated)."""
    candidates = [
        shutil.which("python3.12"),
        *sorted(glob.glob("/root/.pyenv/versions/3.12*/bin/python3.12")),
    ]
    for python in filter(None, candidates):
        cp = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
            capture_output=True,
            text=True,
        )
        if cp.stdout.strip() == "True":
            return python
    return None


def test_wheels_resolve_and_install_offline_for_cpython_312(tmp_path):
    """The real download (PyPI), then the offline install gpu-check does, with a Python 3.12."""
    python312 = _python312()
    if python312 is None:
        pytest.skip("no python3.12 here to install the cp312 wheels with")
    cp = _run(ROOT / "scripts" / "gpu_wheels.py", "--dest", tmp_path / "wheels", timeout=600)
    if cp.returncode != 0 and ("Could not fetch" in cp.stderr or "connection" in cp.stderr.lower()):
        pytest.skip(f"PyPI unreachable: {cp.stderr.strip()[-200:]}")
    assert cp.returncode == 0, cp.stderr
    wheels = list((tmp_path / "wheels").glob("*.whl"))
    assert any(w.name.startswith("pydantic_core-") and "cp312" in w.name for w in wheels)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import gpu_check; from pathlib import Path;"
        "print(gpu_check.install(Path(sys.argv[2]), Path(sys.argv[3])))"
    )
    cp = subprocess.run(
        [python312, "-c", code, ROOT / "scripts", tmp_path / "wheels", tmp_path / "site"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cp.returncode == 0, cp.stderr
    check = subprocess.run(
        [python312, "-c", "import fastapi, uvicorn, openai, pygdbmi, elftools, pydantic_core"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path / "site")},
    )
    assert check.returncode == 0, check.stderr


def test_gpu_check_without_cuda_is_one_line_and_exit_2(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    cp = _run(SCRIPT, "--skip-install", "--out", tmp_path)
    assert cp.returncode == 2
    assert cp.stderr.strip().count("\n") == 0 and "no CUDA device here" in cp.stderr


def test_gpu_check_without_carried_wheels_says_how_to_get_them(tmp_path):
    pytest.importorskip("torch")
    cp = _run(SCRIPT, "--device", "cpu", "--wheels", tmp_path / "none", "--out", tmp_path / "out")
    assert cp.returncode == 2 and "make gpu-wheels" in cp.stderr


@pytest.mark.parametrize("args", [["--checks", "pinned,bogus"], ["--duration", "2"]])
def test_gpu_check_bad_arguments_exit_2(args):
    cp = _run(SCRIPT, *args)
    assert cp.returncode == 2 and "error:" in cp.stderr


def test_cpu_rehearsal_runs_the_scenarios_end_to_end(tmp_path):
    """The server on the CPU under load, watched: completions and streamed chat through the openai
    client, no leak without one, and the pinned leak (mlocked anonymous memory here) found with
    the slope the server leaked at."""
    pytest.importorskip("torch")
    cp = _run(
        SCRIPT,
        "--device",
        "cpu",
        "--skip-install",
        "--checks",
        "api,none,pinned,device",
        "--duration",
        "10",
        "--warmup",
        "3",
        "--out",
        tmp_path,
        "--json",
        timeout=600,
    )
    assert cp.returncode == 0, cp.stderr[-3000:]
    doc = json.loads(cp.stdout)
    status = {c["name"]: c["status"] for c in doc["checks"]}
    assert status == {
        "api on the device": "pass",
        "leak none": "pass",
        "leak pinned": "pass",
        "leak device": "skip",
    }, doc
    pinned = next(c for c in doc["checks"] if c["name"] == "leak pinned")
    assert pinned["top_class"] == "anon" and pinned["relative_error"] <= 0.2
    assert json.loads((tmp_path / "summary.json").read_text())["exit_code"] == 0
    assert (tmp_path / "watch-pinned" / "samples.jsonl").is_file()


def test_bench_gpu_without_cuda_says_so_and_exits_0():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    cp = _run(ROOT / "bench" / "gpu.py")
    assert cp.returncode == 0 and cp.stdout.count("\n") == 1 and "no CUDA device here" in cp.stdout


def test_bench_gpu_kv_bookkeeping_on_the_cpu():
    """Paged wastes less KV and holds more sequences than contiguous at the same budget (the
    scheduler's bookkeeping: the same numbers on any device)."""
    pytest.importorskip("torch")
    cp = _run(
        ROOT / "bench" / "gpu.py",
        "--device",
        "cpu",
        "--requests",
        "16",
        "--kv-cache-mb",
        "4",
        "--max-model-len",
        "1024",
        "--rounds",
        "1",
        "--json",
        timeout=300,
    )
    assert cp.returncode == 0, cp.stderr
    s = json.loads(cp.stdout)["serving"]
    assert s["paged"]["waste"] < 0.04 < s["contiguous"]["waste"]
    assert s["paged"]["max_batch"] > s["contiguous"]["max_batch"]
    assert json.loads(cp.stdout)["decode_kernel"] == []
