"""JUnit XML of a CI gate result: one test suite, one test case for the RSS slope, so that any CI
system's test view shows the leak (failure), the pass, or why the gate could not measure (error)."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET

from leakhunt.ci import ERROR, FAIL, GateResult
from leakhunt.units import format_bytes, format_rate

SUITE = "leakhunt ci"


def junit_xml(result: GateResult) -> bytes:
    cases = 1
    suites = ET.Element(
        "testsuites",
        name=SUITE,
        tests=str(cases),
        failures=str(int(result.exit_code == FAIL)),
        errors=str(int(result.exit_code == ERROR)),
        time=f"{result.elapsed_s:.3f}",
    )
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=SUITE,
        tests=str(cases),
        failures=suites.get("failures"),
        errors=suites.get("errors"),
        skipped="0",
        time=f"{result.elapsed_s:.3f}",
        timestamp=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    )
    props = ET.SubElement(suite, "properties")
    for name, value in _properties(result):
        ET.SubElement(props, "property", name=name, value=str(value))
    case = ET.SubElement(
        suite,
        "testcase",
        classname="leakhunt.ci",
        name=f"memory growth of {result.target}",
        time=f"{result.elapsed_s:.3f}",
    )
    if result.exit_code == FAIL:
        ET.SubElement(case, "failure", message=result.reason, type="MemoryLeak").text = _details(result)
    elif result.exit_code == ERROR:
        ET.SubElement(case, "error", message=result.reason, type="GateError").text = _details(result)
    ET.SubElement(case, "system-out").text = _details(result)
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


def _properties(result: GateResult) -> list[tuple[str, object]]:
    props: list[tuple[str, object]] = [
        ("max_slope_bytes_per_s", result.config.max_slope),
        ("target", result.target),
    ]
    s = result.summary
    if s is not None:
        t = s.rss.verdict.trend
        props += [
            ("slope_bytes_per_s", t.slope),
            ("slope_lower_bytes_per_s", t.lo),
            ("slope_upper_bytes_per_s", t.hi),
            ("samples", s.samples),
            ("duration_s", round(s.duration_s, 3)),
            ("rss_start_bytes", s.rss.start),
            ("rss_end_bytes", s.rss.end),
        ]
    return props


def _details(result: GateResult) -> str:
    lines = [result.reason, f"target: {result.target}", f"gate: {result.config.describe()}"]
    s = result.summary
    if s is not None:
        lines.append(
            f"RSS {format_bytes(s.rss.start)} -> {format_bytes(s.rss.end)} "
            f"({format_bytes(s.rss.growth, signed=True)}) over {s.samples} samples"
        )
        for klass, c in sorted(s.classes.items(), key=lambda kv: -kv[1].growth):
            if c.growth:
                lines.append(
                    f"  {klass.value:8} {format_bytes(c.growth, signed=True):>12}  "
                    f"{format_rate(c.verdict.trend.slope)}"
                )
        for g in s.groups[:5]:
            lines.append(f"  group {g.label}: {format_bytes(g.growth, signed=True)}")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)
