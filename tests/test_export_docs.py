"""The examples in docs/ stay true: every metric the alert rules and the dashboard query is one
the exporter serves, and the example workflow uses only options `leakhunt ci` has."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import ROOT, run_leakhunt

from leakhunt.export import Fleet, FleetCollector

DOCS = ROOT / "docs"
METRIC = re.compile(r"\bleakhunt_[a-z_]+")


def _served_names(pid: int) -> set[str]:
    fleet = Fleet([pid], interval=0.2)
    for _ in range(3):
        fleet.sample_once()
    return {s.name for family in FleetCollector(fleet).collect() for s in family.samples} | {
        family.name for family in FleetCollector(fleet).collect()
    }


def test_alerts_and_dashboard_query_served_metrics(leakers, spawn):
    served = _served_names(spawn([leakers / "steady"]).pid)
    alerts = (DOCS / "prometheus-alerts.yml").read_text()
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    exprs += " ".join(v.get("definition", "") for v in dashboard["templating"]["list"])
    used = set(METRIC.findall(alerts)) | set(METRIC.findall(exprs))
    # The culprit family is declared even before a tracer feeds it; it has no sample yet.
    assert used and used <= served | {"leakhunt_culprit_outstanding_bytes"}, used - served


def test_example_workflow_uses_real_ci_options():
    workflow = (DOCS / "github-actions-example.yml").read_text()
    gate = workflow.split("leakhunt ci", 1)[1].split("\n\n", 1)[0]
    ours = re.sub(r'"[^"]*"', "", gate.split(" -- ", 1)[0])  # --load's quoted command is not ours
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", ours))
    help_text = run_leakhunt("ci", "--help", check=True).stdout
    assert options and all(o in help_text for o in options), options
    assert Path(DOCS / "ci.md").read_text().count("leakhunt ci") > 2
