"""deploy/: the Kubernetes manifests checked against the Kubernetes schemas, and the container's
entry point and arguments parsed by the real CLI (no cluster and no docker daemon here)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import kubernetes_validate as kv
import yaml

from leakhunt.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = "1.30"


def _documents() -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "daemonset.yaml").read_text()) if d]


def _parses(args: list[str]) -> None:
    """The arguments as the real CLI reads them: every option's type runs, nothing else does."""
    name, rest = args[0], args[1:]
    ctx = cli.make_context("leakhunt", [name])
    command = cli.get_command(ctx, name)
    assert command is not None, f"leakhunt has no command {name!r}"
    command.make_context(name, rest, parent=ctx)


def test_manifests_are_valid_kubernetes():
    docs = _documents()
    assert {d["kind"] for d in docs} == {"Namespace", "DaemonSet"}
    for doc in docs:
        kv.validate(doc, KUBERNETES, strict=True)  # raises ValidationError on any unknown field


def test_daemonset_sees_the_host_and_serves_metrics():
    ds = next(d for d in _documents() if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    container = pod["containers"][0]
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    _parses(args)
    port = int(args[args.index("--port") + 1])
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in container["ports"]
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/sys/kernel/tracing", "/sys/fs/cgroup", "/lib/modules"} <= mounts  # BPF and the cgroup view
    assert {"BPF", "PERFMON", "SYS_PTRACE"} <= set(container["securityContext"]["capabilities"]["add"])


def test_image_entry_point_is_the_real_command():
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    entry = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT ")).split(" ", 1)[1])
    cmd = json.loads(next(line for line in lines if line.startswith("CMD ")).split(" ", 1)[1])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry == ["leakhunt"] and scripts["leakhunt"] == "leakhunt.__main__:main"
    _parses(cmd)
    assert any(line.startswith("FROM debian:bookworm") for line in lines)  # what leakhunt is tested on
    assert re.search(r"apt-get install[^\n]*\\\n[^\n]*python3-bpfcc", "\n".join(lines))


def test_scrape_config_and_alert_rules():
    prom = yaml.safe_load((DEPLOY / "prometheus-scrape.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    keep = {
        tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"
    }
    assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == "leakhunt"
    assert prom["rule_files"] == ["prometheus-alerts.yml"]
    rules = yaml.safe_load((ROOT / "docs" / "prometheus-alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"NativeMemoryLeak", "HeldSharedMemoryLeak", "MemoryCgroupLimitInSight"} <= names
