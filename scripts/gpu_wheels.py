"""`make gpu-wheels`: download, here (with network), the wheels the GPU machine's Python 3.12 lacks
for `make gpu-check` there (no network): leakhunt's and the reference server's dependencies that
its image does not have (the web stack, the gdb driver, the openai client), with their whole
dependency closure for cp312 manylinux x86-64, and a requirements.txt naming the top level.

The image's packages are listed in IMAGE_HAS (read from the device machine's package list); the
wanted ones come from pyproject.toml, the one place the project's dependencies are written.
Versions are pinned to this checkout's venv where it has them: the versions the tests ran with.

    python scripts/gpu_wheels.py [--dest gpu-wheels] [--pin-from .venv/bin/python]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: What the GPU machine's image already has, among what leakhunt and the reference server need
#: (its package list, 2026-11-17): never carried, the image's own builds are kept (torch above all).
IMAGE_HAS = frozenset(
    {
        "torch",
        "triton",
        "nvidia-ml-py",
        "numpy",
        "pandas",
        "scipy",
        "matplotlib",
        "psutil",
        "click",
        "rich",
        "prometheus-client",
        "httpx",
        "pytest",
        "pytest-timeout",
        "setuptools",
    }
)
#: Wanted beyond pyproject's runtime and refserver/gpu extras: the client gpu-check talks to the
#: server with, as users do.
EXTRA = ("openai",)
#: Every tag a cp312 manylinux x86-64 wheel may carry: pip matches the glibc level exactly.
PLATFORMS = ["manylinux2014_x86_64", "manylinux1_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in range(17, 40)]
#: What one call of the device tool may carry, all told (its README): the wheels must fit with the tree.
CARRY_LIMIT = 64 * 2**20


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def wanted(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Requirements (as pyproject writes them) that the GPU image lacks."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    requirements = list(project["dependencies"]) + extras.get("refserver", []) + extras.get("gpu", [])
    requirements += [r for r in extras.get("dev", []) if _name(r) in EXTRA]
    seen: dict[str, str] = {}
    for r in requirements:
        name = _name(r)
        if name not in IMAGE_HAS:
            seen.setdefault(name, r.split(";")[0].strip())
    return list(seen.values())


def pinned(requirements: list[str], python: str | None) -> list[str]:
    """name==version from ``python``'s installed distributions where it has them."""
    if not python or not Path(python).exists():
        return requirements
    names = [_name(r) for r in requirements]
    code = (
        "import importlib.metadata as m, sys\nfor n in sys.argv[1:]:\n"
        "    try: print(n, m.version(n))\n    except m.PackageNotFoundError: print(n, '-')"
    )
    out = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, check=True).stdout
    versions = dict(line.split() for line in out.splitlines())
    return [
        f"{_name(r)}=={versions[_name(r)]}" if versions.get(_name(r), "-") != "-" else r for r in requirements
    ]


def download(requirements: list[str], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()  # one version of each package: two would stop the install there
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--dest",
        str(dest),
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--abi",
        "cp312",
        "--abi",
        "abi3",
        "--abi",
        "none",
        *[arg for p in PLATFORMS for arg in ("--platform", p)],
        "--platform",
        "any",
        *requirements,
    ]
    cp = subprocess.run(argv, capture_output=True, text=True)
    if cp.returncode != 0:
        raise SystemExit(f"gpu-wheels: pip download failed:\n{cp.stderr.strip()[-3000:]}")
    return sorted(dest.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", default=str(ROOT / "gpu-wheels"), help="folder for the wheels (git-ignored)")
    ap.add_argument(
        "--pin-from",
        default=str(ROOT / ".venv" / "bin" / "python"),
        help="interpreter whose installed versions pin the top level (default: the project venv)",
    )
    ap.add_argument("--list", action="store_true", help="print the requirements and download nothing")
    a = ap.parse_args(argv)
    requirements = pinned(wanted(), a.pin_from)
    if a.list:
        print("\n".join(requirements))
        return 0
    if (
        shutil.which("pip") is None
        and subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0
    ):
        raise SystemExit(
            f"gpu-wheels: {sys.executable} has no pip (python3 -m ensurepip, or PYTHON=.venv/bin/python)"
        )
    dest = Path(a.dest)
    wheels = download(requirements, dest)
    (dest / "requirements.txt").write_text("\n".join(requirements) + "\n")
    size = sum(w.stat().st_size for w in wheels)
    print(
        f"gpu-wheels: {len(wheels)} wheels for CPython 3.12 manylinux x86-64 in {dest} "
        f"({size / 2**20:.1f} MiB; the device tool carries {CARRY_LIMIT >> 20} MiB with the tree)"
    )
    print("  top level: " + " ".join(requirements))
    if size > CARRY_LIMIT // 2:
        print("gpu-wheels: warning: over half of what one device call can carry")
    print(f"next, on the GPU machine (carry {dest.name}/): make gpu-check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
