"""`leakhunt report`: post-mortems of real recordings (a leak, a target that died, a leakhunt that
was killed), the tracer/correlator streams when a recording has them, and a look through a
real browser when one is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import leakhunt_json, read_markdown, run_leakhunt

from leakhunt.analysis.correlate import Attribution, Culprit
from leakhunt.analysis.culprits import KnownCulprit
from leakhunt.proc.classes import RegionClass
from leakhunt.record import SessionWriter


def _record_watch(leakers: Path, out: Path, leaker_args: list[str], duration: str) -> Path:
    proc = subprocess.Popen([leakers / "pool_leaker", *leaker_args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        run_leakhunt(
            "watch",
            "--pid",
            proc.pid,
            "--interval",
            "0.5s",
            "--duration",
            duration,
            "--record",
            out,
            "--json",
        )
    finally:
        proc.terminate()
        proc.wait()
    return out


@pytest.fixture(scope="module")
def leak_recording(leakers, tmp_path_factory) -> Path:
    return _record_watch(
        leakers, tmp_path_factory.mktemp("rep") / "pool", ["--rate", "4M", "--chunk", "1M"], "6s"
    )


@pytest.fixture(scope="module")
def leak_report(leak_recording, tmp_path_factory):
    out = tmp_path_factory.mktemp("rendered")
    doc = leakhunt_json("report", leak_recording, "--html", out / "r.html", "--markdown", out / "r.md")
    return doc, out


def test_leak_report_has_the_verdict_and_at_least_four_plots(leak_report):
    doc, out = leak_report
    assert doc["verdict"] == "leak" and doc["complete"]
    assert len(doc["plots"]) >= 4
    assert {"rss-by-class", "top-groups", "slope-fit", "class-rates"} <= set(doc["plots"])
    assert doc["summary"]["classes"]["anon"]["leak"]


def test_html_is_self_contained(leak_report):
    _, out = leak_report
    html = (out / "r.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 4
    assert not re.search(r'(src|href)="(https?:)?//', html), "no external asset"
    assert "<script" not in html and "<link" not in html
    assert "LEAK" in html and "No tracer data in this recording" in html


def test_markdown_links_plots_written_beside_it(leak_report):
    _, out = leak_report
    md = read_markdown(out / "r.md")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) >= 4 and all((out / link).is_file() for link in links)
    assert "## Reproduce" in md and "leakhunt report" in md


def test_killed_leakhunt_leaves_an_incomplete_recording_that_still_renders(leak_recording, tmp_path):
    rec = tmp_path / "killed"
    shutil.copytree(leak_recording, rec)
    (rec / "summary.json").unlink()
    with open(rec / "samples.jsonl", "ab") as f:
        f.write(b'{"seq": 999, "ts": 1')  # the write a crash cut short
    doc = leakhunt_json("report", rec, "--markdown", tmp_path / "k.md")
    assert not doc["complete"] and doc["verdict"] == "leak"
    assert any("truncated" in p for p in doc["problems"])
    assert "Incomplete recording" in read_markdown(tmp_path / "k.md")


def test_target_that_died_is_reported(leakers, tmp_path):
    rec = _record_watch(
        leakers, tmp_path / "died", ["--rate", "4M", "--chunk", "1M", "--duration", "4"], "20s"
    )
    doc = leakhunt_json("report", rec, "--markdown", tmp_path / "d.md")
    assert "The target exited during the run" in read_markdown(tmp_path / "d.md")
    assert doc["summary"]["samples"] >= 6


def _leakpool_attribution() -> Attribution:
    known = KnownCulprit(
        id="leakpool",
        name="leak pool",
        explanation="an invalidation queue that grows",
        remedies=("LKPOOL_MAX_UNRELEASED=1024",),
        references=(),
        classes=frozenset({RegionClass.ANON}),
    )
    culprit = Culprit(
        library="libleakpool.so",
        symbol="lkpool_grow",
        klass=RegionClass.ANON,
        bytes=40 << 20,
        slope=4 << 20,
        share=40 / 44,
        evidence="traced mmap",
        stack=("libleakpool.so!lkpool_grow+0x4c", "libleakpool.so!lkpool_release+0x10"),
        stack_partial=True,
        known=known,
        pid=1,
        mappings=40,
    )
    return Attribution(
        growth=44 << 20, growth_by_class={RegionClass.ANON: 44 << 20}, duration_s=10.0, culprits=[culprit]
    )


def test_attribution_reads_back_as_it_was_written():
    """The report reads investigate's typed results back: what to_json() writes, from_json() returns."""
    written = _leakpool_attribution()
    read = Attribution.from_json(json.loads(json.dumps(written.to_json())))
    assert read.to_json() == written.to_json()
    assert read.sentence() == written.sentence() and read.culprits[0].known.remedies == (
        "LKPOOL_MAX_UNRELEASED=1024",
    )


def test_tracer_and_correlator_streams_are_drawn(leak_recording, tmp_path):
    rec = tmp_path / "traced"
    shutil.copytree(leak_recording, rec)
    t0 = json.loads((rec / "samples.jsonl").read_text().splitlines()[0])["ts"]
    writer = SessionWriter(rec, "investigate", append=True)  # joins the watch recorded just before
    for i in range(10):
        writer.append(
            "ledger",
            {
                "ts": t0 + i,
                "callers": [
                    {"caller": "libleakpool.so!lkpool_grow+0x4c", "bytes": (i + 1) << 22, "mappings": i + 1},
                    {"caller": "pool_leaker!tick+0x31", "bytes": 1 << 16, "mappings": 1},
                ],
            },
        )
    # What investigate writes: a verdict record whose attribution is Attribution.to_json().
    attribution = _leakpool_attribution()
    writer.append("verdict", {"t": 9.0, "leak": True, "attribution": attribution.to_json()})
    writer.close()
    doc = leakhunt_json("report", rec, "--markdown", tmp_path / "t.md")
    assert {"attribution", "outstanding-by-caller"} <= set(doc["plots"]) and doc["tracer_data"]
    md = read_markdown(tmp_path / "t.md")
    assert "libleakpool.so!lkpool_grow+0x4c" in md and "LKPOOL_MAX_UNRELEASED=1024" in md
    assert "No tracer data" not in md and "lkpool_release+0x10" in md and "(partial stack)" in md
    assert "91% of native memory growth is anonymous memory mapped by" in md
    assert "Top culprit: libleakpool.so!lkpool_grow (91% of the growth)" in doc["answer"]
    assert "an invalidation queue that grows" in md


def test_not_a_recording_is_one_line_and_exit_2(tmp_path):
    cp = run_leakhunt("report", tmp_path)
    assert cp.returncode == 2 and "not a leakhunt recording" in cp.stderr and "Traceback" not in cp.stderr


def test_screenshot_in_headless_chromium_is_a_real_page(leak_report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium): the report's look is not checked")
    _, out = leak_report
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,3000",
            f"--screenshot={shot}",
            (out / "r.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 3000)
    # A page that failed to lay out (or to decode its plots) is nearly one colour.
    assert len(image.getcolors(maxcolors=1 << 20) or ()) > 200


def test_process_tree_is_reported_by_its_totals_and_per_process(leakers, tmp_path):
    import os
    import signal

    shell = subprocess.Popen(
        ["sh", "-c", f"{leakers / 'pool_leaker'} --rate 4M --chunk 1M & {leakers / 'steady'} & wait"],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        run_leakhunt(
            "watch",
            "--pid",
            shell.pid,
            "--subprocesses",
            "--interval",
            "0.5s",
            "--duration",
            "5s",
            "--record",
            tmp_path / "tree",
            "--json",
        )
    finally:
        os.killpg(shell.pid, signal.SIGTERM)
        shell.wait()
    doc = leakhunt_json("report", tmp_path / "tree", "--markdown", tmp_path / "t.md")
    assert doc["verdict"] == "leak", "the tree's totals grow although its root does not"
    md = read_markdown(tmp_path / "t.md")
    rows = md.split("## Processes in the tree", 1)[1].split("\n## ", 1)[0]
    assert "(root)" in rows and rows.count("| leak |") == 1


@pytest.mark.bpf
def test_real_trace_recording_draws_outstanding_bytes_by_caller(leakers, spawn, tmp_path):
    leaker = spawn([leakers / "pool_leaker", "--rate", "4M", "--chunk", "1M", "--churn", "50"])
    run_leakhunt(
        "trace-mmap",
        "--pid",
        leaker.pid,
        "--duration",
        "5s",
        "--record",
        tmp_path / "rec",
        "--json",
        check=True,
    )
    doc = leakhunt_json("report", tmp_path / "rec", "--markdown", tmp_path / "t.md")
    assert "outstanding-by-caller" in doc["plots"] and doc["tracer_data"]
    md = read_markdown(tmp_path / "t.md")
    assert "lkpool_grow" in md and "No tracer data" not in md


@pytest.mark.parametrize("samples", [1, 2])
def test_a_recording_with_almost_no_samples_renders_every_section(leak_recording, tmp_path, samples):
    import os

    rec = tmp_path / "short"
    shutil.copytree(leak_recording, rec)
    lines = (rec / "samples.jsonl").read_text().splitlines(keepends=True)
    (rec / "samples.jsonl").write_text("".join(lines[:samples]))
    cp = run_leakhunt(
        "report", rec, "--html", tmp_path / "r.html", "--json", env={**os.environ, "PYTHONWARNINGS": "error"}
    )
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["verdict"] == "inconclusive"
    assert "could not be drawn" not in (tmp_path / "r.html").read_text()
