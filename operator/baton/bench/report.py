"""Pure helpers shared by Baton's benchmarks: statistics, targets, machine facts and BENCHMARKS.md sections.

Nothing here starts processes or sends requests, so all of it is unit-tested.

BENCHMARKS.md holds one section per benchmark between markers

    <!-- bench:NAME:start -->
    ...
    <!-- bench:NAME:end -->

and `replace_section` rewrites only the text between one pair, so benchmarks written by different
commands (and hand-written text outside the markers) survive each other's runs.
"""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# One percentile definition for replay and the benchmarks (linear interpolation, numpy's default).
from baton.atomicfile import write_atomic
from baton.checkout import repo_root
from baton.replay import percentile
from typing import Any

INTRO = """# Benchmarks

Measured by `baton bench <name>` (`make bench-<name>`) on the machine described in each section, and
rewritten by the next run (a section may carry a table of its recent runs' verdicts over). Speed targets
live here, not in timed tests: each value is measured against a baseline taken in the same run and
compared with its target.
"""


# ------------------------------------------------------------------------------------------------ stats
def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float | None]:
    return {f"p{q:g}": percentile(values, q) for q in qs}


def added(subject: Mapping[str, float | None], baseline: Mapping[str, float | None]) -> dict[str, float | None]:
    """Per-percentile difference subject - baseline (the latency a hop adds), None where either is missing."""
    out: dict[str, float | None] = {}
    for key, value in subject.items():
        base = baseline.get(key)
        out[key] = None if value is None or base is None else value - base
    return out


def paired_differences(subject: Mapping[Any, float], baseline: Mapping[Any, float]) -> list[float]:
    """subject[k] - baseline[k] for every key measured on both paths (the same request sent both ways)."""
    return [subject[k] - baseline[k] for k in subject.keys() & baseline.keys()]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def per_item(total: float | None, count: int) -> float | None:
    """total / count, None when there is nothing to divide (e.g. CPU seconds per completed request)."""
    if total is None or count <= 0:
        return None
    return total / count


# ------------------------------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class Target:
    """`value <op> limit`; op is '<=' or '>='."""

    op: str
    limit: float

    def check(self, value: float | None) -> bool | None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if self.op == "<=":
            return value <= self.limit
        if self.op == ">=":
            return value >= self.limit
        raise ValueError(f"unknown operator {self.op!r}")


@dataclass
class Metric:
    key: str
    label: str
    value: float | None
    unit: str
    target: Target | None = None
    note: str = ""
    passed: bool | None = None  # set by `evaluate`, or directly for yes/no checks
    missed_by: str = ""  # when a rule other than the target failed a value within it: what decided

    def evaluate(self) -> Metric:
        if self.target is not None:
            self.passed = self.target.check(self.value)
        return self


def fmt_value(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit in ("req/s",):
        text = f"{value:,.0f}"
    elif unit == "x":
        text = f"{value:.2f}"
    elif unit == "count":
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip() if unit not in ("count", "") else text


def fmt_target(target: Target | None, unit: str = "") -> str:
    if target is None:
        return "-"
    return f"{'≤' if target.op == '<=' else '≥'} {fmt_value(target.limit, unit)}"


def fmt_result(passed: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "n/a"}[passed]


def markdown_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def markdown_cells(row: str) -> list[str]:
    """The cells of a `markdown_row` line, unescaped."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row.strip()[1:-1])]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += [markdown_row(row) for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ machine
def machine_facts() -> dict[str, Any]:
    """What a reader needs to judge the numbers: cores, CPU model, Python, kernel, load before the run."""
    facts: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(terse=True),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        facts["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return facts


# ------------------------------------------------------------------------------------------------ BENCHMARKS.md
def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def replace_section(document: str, name: str, body: str, intro: str = INTRO) -> str:
    """`document` with the text between bench:NAME markers replaced by `body` (markers kept).

    An empty document becomes `intro` plus the section; a document without the markers gets the section
    appended at the end. Everything outside the markers is left byte for byte as it was.
    """
    start, end = markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(document):
        return pattern.sub(lambda _m: block, document, count=1)
    if not document.strip():
        return f"{intro.rstrip()}\n\n{block}\n"
    return f"{document.rstrip()}\n\n{block}\n"


def table_rows_under(document: str, name: str, heading: str) -> list[str]:
    """The rows (`| ...` lines, without the header and its rule) of the table that follows the line
    `heading` inside section NAME of `document`; [] when there is none."""
    start, end = markers(name)
    a = document.find(start)
    b = document.find(end, a)
    if a < 0 or b < 0:
        return []
    lines = document[a:b].splitlines()
    try:
        at = lines.index(heading)
    except ValueError:
        return []
    rows: list[str] = []
    for line in lines[at + 1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows or line.startswith("#"):
            break  # the table is over, or the next heading came first
    return rows[2:]  # header and rule


def code_version(root: Path | None, ignore: Sequence[str] = ("BENCHMARKS.md",)) -> str:
    """The commit a benchmark ran (short id), with '+ uncommitted changes' when tracked files other than
    `ignore` differ from it; '-' when `root` is not a git checkout (or git is missing)."""
    if root is None:
        return "-"
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "-"
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "-"
    dirty = any(line[3:].strip() not in ignore for line in changed.stdout.splitlines())
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def write_section(path: str | Path, name: str, body: str, intro: str = INTRO) -> None:
    """Replace one section of the file at `path` (created if absent), atomically (write + rename)."""
    path = Path(path)
    try:
        current = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        current = ""
    write_atomic(path, replace_section(current, name, body, intro).encode("utf-8"))


def default_output() -> Path:
    root = repo_root()
    return (root if root is not None else Path.cwd()) / "BENCHMARKS.md"
