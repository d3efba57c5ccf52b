"""Pure helpers of the benchmarks: percentiles and differences, targets, and BENCHMARKS.md sections."""

from __future__ import annotations

import subprocess

import pytest

from baton.bench.report import (
    INTRO,
    Metric,
    Target,
    added,
    code_version,
    fmt_target,
    fmt_value,
    markdown_cells,
    markdown_table,
    paired_differences,
    per_item,
    percentile,
    percentiles,
    ratio,
    replace_section,
    table_rows_under,
    write_section,
)


def test_percentile_interpolates_linearly_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 99) == pytest.approx(3.97)  # numpy.percentile([1, 2, 3, 4], 99)
    assert percentile([5.0], 99) == 5.0
    assert percentile([], 50) is None
    assert percentile(reversed(values), 25) == pytest.approx(1.75)  # order does not matter


def test_percentiles_keys():
    assert percentiles(list(range(101))) == {"p50": 50, "p90": 90, "p99": 99}
    assert percentiles([], (50,)) == {"p50": None}


def test_added_is_subject_minus_baseline_per_percentile():
    sched = {"p50": 3.0, "p99": 10.0, "p90": None}
    direct = {"p50": 2.5, "p99": 4.0, "p90": 1.0}
    assert added(sched, direct) == {"p50": 0.5, "p99": 6.0, "p90": None}
    assert added({"p50": 1.0}, {}) == {"p50": None}


def test_paired_differences_use_requests_measured_on_both_paths():
    direct = {("0", 1): 0.010, ("0", 2): 0.020, ("1", 1): 0.030}
    sched = {("0", 1): 0.011, ("0", 2): 0.025, ("1", 7): 0.5}
    assert sorted(paired_differences(sched, direct)) == pytest.approx([0.001, 0.005])
    assert paired_differences({}, direct) == []


def test_ratio_and_per_item_guard_against_missing_values():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None
    assert per_item(2.0, 4) == 0.5
    assert per_item(None, 4) is None and per_item(2.0, 0) is None


def test_targets_and_metrics():
    assert Target("<=", 1.0).check(1.0) is True
    assert Target("<=", 1.0).check(1.01) is False
    assert Target(">=", 1500).check(1499.9) is False
    assert Target(">=", 1500).check(None) is None
    assert Target("<=", 1.0).check(float("nan")) is None
    with pytest.raises(ValueError):
        Target("<", 1.0).check(0.5)
    m = Metric("k", "label", 0.8, "ms", Target("<=", 1.0)).evaluate()
    assert m.passed is True
    m = Metric("k", "label", None, "ms", Target("<=", 1.0)).evaluate()
    assert m.passed is None
    m = Metric("k", "yes/no", 3, "count", None, passed=False).evaluate()
    assert m.passed is False  # no target: evaluate() keeps what was set


def test_formatting():
    assert fmt_value(None, "ms") == "n/a"
    assert fmt_value(0.4567, "ms") == "0.46 ms"
    assert fmt_value(12.34, "ms") == "12.3 ms"
    assert fmt_value(1234.5, "ms") == "1,234 ms"  # banker's rounding of .5 does not matter here
    assert fmt_value(1499.6, "req/s") == "1,500 req/s"
    assert fmt_value(1.234, "x") == "1.23 x"
    assert fmt_value(7, "count") == "7"
    assert fmt_target(Target("<=", 1.0), "ms") == "≤ 1.00 ms"
    assert fmt_target(Target(">=", 1500.0), "req/s") == "≥ 1,500 req/s"
    assert fmt_target(None) == "-"
    table = markdown_table(["a", "b"], [["1", "x|y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |"]
    assert markdown_cells(table.splitlines()[2]) == ["1", "x|y"]  # a row read back, its escaped pipe kept


START, END = "<!-- bench:scheduler:start -->", "<!-- bench:scheduler:end -->"


def test_replace_section_in_an_empty_document_adds_the_intro():
    doc = replace_section("", "scheduler", "## Scheduler\n\nnumbers")
    assert doc.startswith(INTRO.splitlines()[0])
    assert f"{START}\n## Scheduler\n\nnumbers\n{END}\n" in doc


def test_replace_section_keeps_everything_outside_its_markers():
    other = "<!-- bench:operator:start -->\n## Operator\n\nkeep me\n<!-- bench:operator:end -->"
    doc = f"# Benchmarks\n\nhand-written intro\n\n{START}\nold numbers\n{END}\n\n{other}\n\ntrailer\n"
    new = replace_section(doc, "scheduler", "new numbers")
    assert new == doc.replace("old numbers", "new numbers")
    # idempotent, and a second section is untouched by the first one's updates
    assert replace_section(new, "scheduler", "new numbers") == new
    assert replace_section(new, "operator", "## Operator\n\nkeep me") == new


def test_replace_section_appends_when_the_markers_are_absent():
    doc = "# Benchmarks\n\nsomething else\n"
    new = replace_section(doc, "scheduler", "body")
    assert new == f"# Benchmarks\n\nsomething else\n\n{START}\nbody\n{END}\n"


def test_replace_section_body_is_literal_text():
    # backslashes and group references in the body must not be interpreted as regex replacements
    new = replace_section(f"{START}\nx\n{END}\n", "scheduler", r"a \1 \g<0> b")
    assert r"a \1 \g<0> b" in new


def test_write_section_creates_and_updates_a_file(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "scheduler", "first")
    write_section(path, "operator", "theirs")
    write_section(path, "scheduler", "second")
    text = path.read_text()
    assert "second" in text and "first" not in text and "theirs" in text
    assert text.count(START) == 1 and text.count("<!-- bench:operator:start -->") == 1
    assert not [p for p in tmp_path.iterdir() if p.name != "BENCHMARKS.md"]  # no temporary file left behind


def test_operator_bench_keeps_the_rows_a_partial_run_did_not_measure(tmp_path):
    from baton.bench import operator as bench

    out = tmp_path / "BENCHMARKS.md"
    row = {"seconds": 10.0, "floor_seconds": 9.0, "requests_per_reconcile": 4.5, "noop_writes": 0,
           "noop_reconciles": 12, "noop_requests_per_reconcile": 1.0, "peak_rss_mib": 70}
    full = {1: row, 500: {**row, "seconds": 300.0, "floor_seconds": 260.0}}
    memory_run = {"models": 1000, "ready": 1000, "rss_mib": 140, "peak_rss_mib": 149,
                  "restart_rss_mib": 130, "restart_peak_rss_mib": 151}
    bench.write_report(bench.report(full, memory_run, 60), out)
    assert "peak 151 MiB (misses the 150 MiB target)" in out.read_text()  # a restart counts as well
    bench.write_report(bench.report(full, {**memory_run, "restart_peak_rss_mib": 145}, 60), out)
    rows, memory = bench.previous_results(out)
    assert sorted(rows) == [1, 500] and "meets the 150 MiB target" in memory

    # Only N = 1 again, no memory run: row 500 and the memory line survive, and the section says so.
    bench.write_report(bench.report({1: {**row, "seconds": 5.0}}, None, 30, {500: rows[500]}, memory), out)
    text = out.read_text()
    assert "| 1 | 9.0 | 5.0 | 0.56 |" in text and rows[500] in text and memory in text
    assert "the rows for 500 model(s) and the memory line come from an earlier run" in text
    assert text.count(bench.START) == 1


def test_table_rows_under_a_heading_of_one_section():
    doc = replace_section("", "scheduler", "## S\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n### Runs\n\nsome words\n\n"
                          "| run | code |\n|---|---|\n| r2 | c2 |\n| r1 | c1 |\n\nafter\n| x | y |")
    doc = replace_section(doc, "operator", "### Runs\n\n| run | code |\n|---|---|\n| theirs | t |")
    assert table_rows_under(doc, "scheduler", "### Runs") == ["| r2 | c2 |", "| r1 | c1 |"]
    assert table_rows_under(doc, "operator", "### Runs") == ["| theirs | t |"]
    assert table_rows_under(doc, "scheduler", "### Other") == []
    assert table_rows_under(doc, "missing", "### Runs") == []
    assert table_rows_under(replace_section("", "scheduler", "### Runs\n\nno table"), "scheduler", "### Runs") == []
    no_table = replace_section("", "scheduler", "### Runs\n\nnone yet\n\n### Next\n\n| a |\n|---|\n| 1 |")
    assert table_rows_under(no_table, "scheduler", "### Runs") == []  # not the next heading's table


def test_code_version_names_the_commit_and_says_when_the_tree_differs(tmp_path):
    assert code_version(None) == "-"
    assert code_version(tmp_path) == "-"  # not a checkout
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    git("init", "-q")
    git("config", "user.email", "t@example.invalid")
    git("config", "user.name", "t")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "BENCHMARKS.md").write_text("# Benchmarks\n")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert code_version(tmp_path) == head
    (tmp_path / "BENCHMARKS.md").write_text("# Benchmarks\n\na run\n")  # what a run writes: not a change
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert code_version(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert code_version(tmp_path) == f"{head} + uncommitted changes"
