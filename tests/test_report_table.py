"""The study table a user reads: the terminal table fits 120 columns (a 7-variant, 3-metric study,
in a terminal and printed into a file), the verdicts are valid for the whole study and say for
which family (Holm over the variants by default, none when the study file says so, anytime-valid
for --until-decided studies, with each variant's seeds and why it stopped), and the parent run
answers at a glance: one description line per variant with its verdicts first, rounded tags,
numbers as metrics.

Synthetic Reports (Rows, Stats and verdicts built directly, no training) for the rendering; small
fabricated MLflow studies (a parent with study.json and finished children, as test_report_html)
for what build_report reads: the family from study.json, the mode and max seeds from the tags."""
import io
import json
import re
from dataclasses import asdict

import numpy as np
import pytest
from rich.console import Console

from fcdm_lab.display import output_console, print_wide, report_table
from fcdm_lab.studies.report import AnytimeVerdict, Report, Row, UNTIL_DECIDED, build_report
from fcdm_lab.studies.sequential import sequential_verdicts
from fcdm_lab.studies.verdicts import (BETTER, INCONCLUSIVE, NO_ERROR_BAR, WORSE, Stat, family_verdicts,
                                       summarize)
from fcdm_lab.tracking.client import Tracker

METRICS = ["fid_fashion", "kid_fashion", "class_acc_fashion"]
CENTER = {"fid_fashion": 15.0, "kid_fashion": 0.11, "class_acc_fashion": 0.55}
SCALE = {"fid_fashion": 1.0, "kid_fashion": 0.01, "class_acc_fashion": 0.05}
# The paper's 7 rows; effects in units of each metric's scale (+ = a higher value)
EFFECTS = {"default": 0.0, "k5": -0.6, "k3": 0.7, "cca": 1.9, "extra-ffn": -3.2, "no-bottleneck": -2.0,
           "resnet": -1.0}
POST_HOC = re.compile(r"~\s*\d+ seeds|observed effect|seeds_needed")  # the old post-hoc power wording


def _values(seeds, rng, effects=EFFECTS, noise=0.3):
    """{variant: {metric: per-seed values}}, seed noise shared by the variants of a seed (paired)."""
    shared = {m: rng.normal(0, SCALE[m], len(seeds)) for m in METRICS}
    return {v: {m: list(CENTER[m] + shared[m] + e * SCALE[m] + rng.normal(0, noise * SCALE[m], len(seeds)))
                for m in METRICS} for v, e in effects.items()}


def _row(v, values, seeds, baseline="default"):
    gmacs = 0.1019 * (1 + 0.004 * (len(v) % 4))
    return Row(variant=v, is_baseline=v == baseline, seeds=list(seeds), params=1_310_000 + 977 * len(v),
               gmacs=gmacs, rel_gmacs=None if v == baseline else gmacs / 0.1019 - 1,
               metrics={m: summarize(values[m]) for m in METRICS}, wall_time_s=summarize([580.0 + 9 * len(v)] * 2))


def fixed_report(values=None, *, seeds=(0, 1, 2), holm=True, min_effect=None) -> Report:
    """A 7-variant, 3-metric study of a fixed number of seeds, verdicts as build_report makes them."""
    values = values or _values(seeds, np.random.default_rng(0))
    rows = {v: _row(v, vals, seeds) for v, vals in values.items()}
    for m in METRICS:
        pairs = {v: (values[v][m], values["default"][m]) for v in values if v != "default"}
        for v, verdict in family_verdicts(pairs, lower_is_better=m != "class_acc_fashion", holm_correction=holm,
                                          min_effect=(min_effect or {}).get(m)).items():
            rows[v].verdicts[m] = verdict
    ordered = sorted(rows.values(), key=lambda r: r.metrics["fid_fashion"].mean)
    return Report(run_id="0" * 32, study="paper-ablation-fashion",
                  description="The paper's whole ablation table (7 rows) on 28x28 Fashion-MNIST", status="FINISHED",
                  baseline="default", primary="fid_fashion", metrics=METRICS, rows=ordered, seeds=len(seeds),
                  steps=1000, multiple_comparisons="holm" if holm else "none", min_effect=min_effect or {})


def until_decided_report(max_seeds=12) -> Report:
    """The same study run --until-decided: variants with different numbers of seeds."""
    rng = np.random.default_rng(1)
    n = {"default": 12, "k5": 12, "k3": 9, "cca": 5, "extra-ffn": 4, "no-bottleneck": 6, "resnet": 12}
    values = _values(range(12), rng, noise=0.6)
    rows = {v: _row(v, {m: values[v][m][:n[v]] for m in METRICS}, range(n[v])) for v in values}
    for m in METRICS:
        diffs = {v: [a - b for a, b in zip(values[v][m][:n[v]], values["default"][m])] for v in values if v != "default"}
        for v, sv in sequential_verdicts(diffs, lower_is_better=m != "class_acc_fashion", max_seeds=max_seeds).items():
            d = summarize(diffs[v])
            rows[v].verdicts[m] = AnytimeVerdict(**asdict(sv), family_size=6, max_seeds=max_seeds,
                                                 diff=Stat(d.mean, None, d.n, d.values, d.sd))
    for v, r in rows.items():
        if not r.is_baseline:
            r.stopped = r.verdicts["fid_fashion"].reason
    return Report(run_id="1" * 32, study="paper-ablation-fashion",
                  description="The paper's whole ablation table (7 rows) on 28x28 Fashion-MNIST", status="FINISHED",
                  baseline="default", primary="fid_fashion", metrics=METRICS, rows=list(rows.values()), seeds=12,
                  steps=1000, mode=UNTIL_DECIDED, max_seeds=max_seeds)


def _printed(report, console) -> str:
    report.print(console)
    return console.export_text() if console.record else console.file.getvalue()


def _widths(text: str):
    return [len(line.rstrip()) for line in text.splitlines()]


# ---------------------------------------------------------------------------------------------
# The terminal table
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [fixed_report, until_decided_report])
def test_a_7_variant_3_metric_table_fits_120_columns(make):
    report = make()
    console = Console(width=120, record=True, file=io.StringIO())
    text = _printed(report, console)
    assert max(len(line) for line in text.splitlines()) <= 120, text
    lines = text.splitlines()
    assert lines[0].startswith("Study paper-ablation-fashion: The paper's whole ablation table")  # title left
    header = lines[1].split()
    assert header[0] == "variant" and "GMACs" in header and "Δ" in header and "fid" in header
    assert lines[2].startswith("─")
    # every variant on one line of the table, with every metric's short verdict cell
    for r in report.rows:
        line = next(line for line in lines[3:] if line.split()[0] == r.variant)
        for m in METRICS:
            v = r.verdicts.get(m)
            if v is not None:
                cell = v.interval(compact=True) if isinstance(v, AnytimeVerdict) else v.diff.fmt(signed=True).replace(
                    " ± ", "±")
                assert cell in line, (cell, line)
    # the caption: a few short lines, not one 300-character sentence
    caption = lines[3 + len(report.rows):]
    assert 3 <= len([c for c in caption if c.strip()]) <= 8
    flat = " ".join(text.split())
    assert "report.md" in flat and "Metrics *_fashion" in flat


def test_verdict_words_are_short_and_coloured():
    report = fixed_report()
    table = report_table(report)
    seen = set()
    for column in table.columns:
        for cell in column._cells:
            for word, style in (("better", "green"), ("worse", "red"), ("?", "yellow")):
                if cell.plain.endswith(" " + word):
                    assert [s.style for s in cell.spans] == [style], cell
                    seen.add(word)
            assert "inconclusive" not in cell.plain and len(cell.plain) <= 20
    assert seen == {"better", "worse", "?"}


def test_output_into_a_file_is_120_columns_and_lines_are_not_broken(monkeypatch, capsys):
    """A command's output into a file or pipe (a log, nohup, a scheduler's stdout): 120 columns, not
    rich's 80, unless COLUMNS says otherwise; a study's progress line (soft-wrapped) stays one line
    however long its path or run id."""
    monkeypatch.delenv("COLUMNS", raising=False)
    console = output_console()
    assert not console.is_terminal and console.width == 120
    line = "tiny-digits: training grn (seed 0) (worker 1, trial 12) in runs/studies/" + "x" * 90 + "/grn-seed0"
    console.print(line, highlight=False, soft_wrap=True)
    assert capsys.readouterr().out == line + "\n"
    monkeypatch.setenv("COLUMNS", "90")
    assert output_console(stderr=True).width == 90


def test_printed_into_a_file_it_is_no_wider_than_120_columns():
    """The README shows the table as printed into a file: print_wide widens a non-terminal console
    (80 columns by default) to the table's width, never past 120; a wider console stays as it is and
    the table keeps its width."""
    report = fixed_report()
    for width in (80, 300):
        console = Console(file=io.StringIO(), width=width)
        assert not console.is_terminal
        text = _printed(report, console)
        widths = _widths(text)
        assert max(widths) <= 120 and max(widths) > 80, text
        assert console.width == width  # print_wide restores it
    # a table wider than 120 (no compaction possible at width 1000) is still printed in 120 columns
    console = Console(file=io.StringIO(), width=80)
    print_wide(console, report_table(report, width=1000), max_width=120)
    assert max(_widths(console.file.getvalue())) <= 120
    # a narrow terminal: rich folds, nothing is wider than the terminal
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None)
    assert max(_widths(_printed(report, console))) <= 100


def test_the_full_table_keeps_every_column():
    report = fixed_report()
    md = report.markdown()
    for column in ("params", "GMACs", "matched", "train time", "Δ kid_fashion (verdict)"):
        assert column in report.header() and column in md
    text = report.text()
    assert "matched" not in text and "Δ kid_fashion (verdict)" not in text  # those stay in report.md
    for row in report.cells():
        assert "| " + " | ".join(row) + " |" in md


def test_one_seed_says_no_error_bar():
    values = _values([0], np.random.default_rng(2))
    report = fixed_report(values, seeds=[0])
    text = report.text()
    assert NO_ERROR_BAR in text and "(n=1)" in text and "Holm" not in text
    assert all(r.verdicts["fid_fashion"].verdict == NO_ERROR_BAR for r in report.rows if not r.is_baseline)


# ---------------------------------------------------------------------------------------------
# Verdicts valid for the whole study, and their family stated
# ---------------------------------------------------------------------------------------------

# test_verdicts.py's family: "a" alone is better (p = 0.025); Holm over 3 variants makes it 0.075
BASE = [0.70, 0.75, 0.80, 0.65]
DIFFS = {"a": [-0.10, -0.05, -0.08, -0.03], "b": [0.05, -0.04, 0.02, -0.01], "c": [0.10, -0.20, 0.15, -0.02]}


def _three(holm=True, min_effect=None) -> Report:
    rows = {"base": Row("base", True, [0, 1, 2, 3], metrics={"fid_digits": summarize(BASE)})}
    values = {v: [b + x for b, x in zip(BASE, d)] for v, d in DIFFS.items()}
    for v, verdict in family_verdicts({v: (x, BASE) for v, x in values.items()}, lower_is_better=True,
                                      holm_correction=holm, min_effect=min_effect).items():
        rows[v] = Row(v, False, [0, 1, 2, 3], metrics={"fid_digits": summarize(values[v])},
                      verdicts={"fid_digits": verdict})
    return Report(run_id="2" * 32, study="toy", description="", status="FINISHED", baseline="base",
                  primary="fid_digits", metrics=["fid_digits"], rows=list(rows.values()), seeds=4, steps=10,
                  multiple_comparisons="holm" if holm else "none",
                  min_effect={"fid_digits": min_effect} if min_effect else {})


def test_holm_adjusted_verdicts_and_their_family_everywhere():
    report = _three()
    a = next(r for r in report.rows if r.variant == "a").verdicts["fid_digits"]
    assert a.verdict == INCONCLUSIVE and a.holm_changed  # its own CI excludes 0; Holm over 3 keeps it open
    family = "verdicts Holm-adjusted over the 3 variants of each metric (alpha 0.05)"
    text, md = report.text(), report.markdown()
    assert family in " ".join(text.split()) and family in md and family in report.caption()
    assert "-0.065±0.049 ?" in text and "a ? whose CI excludes 0 is one the correction keeps undecided" in " ".join(
        text.split())
    b = next(r for r in report.rows if r.variant == "b").verdicts["fid_digits"]
    assert f"MDE on fid_digits (the smallest true difference detected with 80% power at this n and alpha/K): " \
           f"a {a.mde:.3f}, b {b.mde:.3f}" in " ".join(text.split())
    assert "-0.065 ± 0.049 inconclusive (Holm p=0.075)" in md
    assert ("MDE = the smallest true difference a paired test at alpha/K detects with 80% power at this n"
            in md)
    assert "Holm-adjusted p=0.075 over 3 variants" in md  # the verdicts in words
    metrics, tags = report.verdict_metrics()
    assert tags["verdict.a.fid_digits"] == INCONCLUSIVE and tags["study.verdicts"] == family
    assert metrics["verdict.a.fid_digits.p"] == pytest.approx(a.p_value)
    assert metrics["verdict.a.fid_digits.p_holm"] == pytest.approx(0.0747, abs=1e-3)
    b = next(r for r in report.rows if r.variant == "b").verdicts["fid_digits"]
    assert metrics["verdict.b.fid_digits.mde"] == pytest.approx(b.mde) and b.family_size == 3
    assert not any(k.endswith(".seeds_needed") for k in metrics)  # no effect of interest: no seeds to plan
    for out in (text, md, report.note(), *tags.values()):
        assert not POST_HOC.search(out), out


def test_no_correction_when_the_study_says_none_and_seeds_for_an_effect_of_interest():
    report = _three(holm=False)
    a = next(r for r in report.rows if r.variant == "a").verdicts["fid_digits"]
    assert a.verdict == BETTER and a.family_size == 1
    assert "not adjusted for multiple comparisons" in report.caption() and "Holm-adjusted" not in report.markdown()
    metrics, _ = report.verdict_metrics()
    assert "verdict.a.fid_digits.p" in metrics and not any(k.endswith(".p_holm") for k in metrics)

    report = _three(min_effect=0.05)
    b = next(r for r in report.rows if r.variant == "b").verdicts["fid_digits"]
    metrics, _ = report.verdict_metrics()
    assert metrics["verdict.b.fid_digits.seeds_needed"] == b.seeds_needed > 4
    assert "effects of interest (the study's min_effect): fid_digits 0.05" in report.caption()
    assert f"the effect of interest 0.050 needs {b.seeds_needed} paired seeds" in report.markdown()


# ---------------------------------------------------------------------------------------------
# --until-decided: anytime-valid verdicts, seeds and why each variant stopped
# ---------------------------------------------------------------------------------------------

def test_until_decided_rows_show_seeds_and_why_they_stopped():
    report = until_decided_report()
    text = " ".join(report.text().split())
    rows = {r.variant: r for r in report.rows}
    assert [len(rows[v].seeds) for v in ("k3", "cca", "extra-ffn")] == [9, 5, 4]
    reasons = {v: r.verdicts["fid_fashion"].reason for v, r in rows.items() if not r.is_baseline}
    assert any(x.startswith("decided at n=") for x in reasons.values())
    assert any(x == "undecided at max seeds (12)" for x in reasons.values())
    for v, r in rows.items():  # the terminal's n and stopped columns
        if r.is_baseline:
            continue
        short = ("decided" if r.verdicts["fid_fashion"].decided else
                 "max seeds" if len(r.seeds) >= 12 else "undecided")
        assert re.search(rf"\b{re.escape(v)} +{len(r.seeds)} +{short}", report.text()), (v, report.text())
    assert "anytime-valid" in text and "Bonferroni over the 6 variants" in text and "max seeds (12)" in text
    md = report.markdown()
    assert "| variant | n | stopped |" in md
    for v, reason in reasons.items():
        assert f"| {v} | n={len(rows[v].seeds)} | {reason} |" in md
    assert "anytime-valid 95% interval" in report.caption() and "Holm" not in md
    metrics, tags = report.verdict_metrics()
    decided = next(v for v, x in reasons.items() if x.startswith("decided"))
    assert tags[f"verdict.{decided}.fid_fashion"] in (BETTER, WORSE)
    assert f"verdict.{decided}.fid_fashion.p_anytime" in metrics and f"verdict.{decided}.fid_fashion.n" in metrics
    assert not any(k.endswith((".p_holm", ".mde")) for k in metrics)
    assert report.note().startswith("- **")


# ---------------------------------------------------------------------------------------------
# The parent run answers at a glance
# ---------------------------------------------------------------------------------------------

class FakeTracker:
    def __init__(self):
        self.metrics, self.tags, self.artifacts = {}, {}, []

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((artifact_path, path.name))

    def log_metrics(self, metrics):
        self.metrics.update(metrics)

    def set_tags(self, tags):
        self.tags.update(tags)


def test_parent_description_starts_with_one_line_per_variant_and_tags_are_rounded():
    report = fixed_report()
    tracker = FakeTracker()
    report.log(tracker)
    assert {name for _, name in tracker.artifacts} == {"report.md", "plot.png", "summary.json", "report.html"}
    note = tracker.tags["mlflow.note.content"]
    variants = [r for r in report.rows if not r.is_baseline]
    lines = note.splitlines()[:len(variants)]
    words = "better|worse|inconclusive|no error bar \\(n=1\\)"
    for r, line in zip(variants, lines):
        assert re.fullmatch(rf"- \*\*{re.escape(r.variant)}\*\*: ({words}) on .+", line), line
        primary = r.verdicts["fid_fashion"]
        assert f"fid_fashion (Δ {primary.diff.fmt(signed=True)})" in line
    assert note.splitlines()[len(variants)] == ""
    assert "Holm-adjusted over the 6 variants" in note and "| cca |" in note  # then the family, then the report
    for r in variants:
        tag = tracker.tags[f"verdict.{r.variant}"]
        parts = tag.split("; ")
        assert [p.split(":")[0] for p in parts] == list(r.verdicts)  # the primary first
        for p, (m, v) in zip(parts, r.verdicts.items()):
            assert p == f"{m}: {v.verdict} ({v.diff.fmt(signed=True)})"
        assert not re.search(r"\d\.\d{6,}", tag)  # rounded to the interval, not 16-digit floats
        assert tracker.tags[f"verdict.{r.variant}.fid_fashion"] == r.verdicts["fid_fashion"].verdict
        for suffix in ("diff", "ci_low", "ci_high", "p", "p_holm"):
            assert isinstance(tracker.metrics[f"verdict.{r.variant}.fid_fashion.{suffix}"], float)
    assert all(isinstance(v, float) for v in tracker.metrics.values())


# ---------------------------------------------------------------------------------------------
# build_report: the family from study.json, the mode from the parent's tags
# ---------------------------------------------------------------------------------------------

def _fake_study(client, values, *, spec_extra=None, tags=None, seeds_used=(0, 1, 2, 3), unfinished=()):
    """A parent run with study.json and one FINISHED child per (variant, seed value given); spec keys
    added by `spec_extra` (a study logged before multiple_comparisons existed has none)."""
    exp = client.get_experiment_by_name("fcdm-lab") or client.get_experiment(client.create_experiment("fcdm-lab"))
    spec = {"name": "toy", "description": "a toy study", "baseline": "base", "metrics": ["fid_digits"],
            "primary": "fid_digits", "variants": [{"name": v} for v in values], **(spec_extra or {})}
    parent = client.create_run(exp.experiment_id, tags={"kind": "ablation", "study": "toy", **(tags or {})})
    client.log_text(parent.info.run_id, json.dumps({"spec": spec, "seeds_used": list(seeds_used), "steps": 10}),
                    "study.json")
    children = [(v, s, x, "FINISHED") for v, xs in values.items() for s, x in enumerate(xs)]
    children += [(v, s, None, status) for v, s, status in unfinished]
    for variant, seed, x, status in children:
        child = client.create_run(exp.experiment_id, tags={"mlflow.parentRunId": parent.info.run_id,
                                                           "variant": variant, "seed": str(seed)})
        if x is not None:
            client.log_metric(child.info.run_id, "fid_digits", float(x))
        client.set_terminated(child.info.run_id, status)
    client.set_terminated(parent.info.run_id, "FINISHED")
    return parent.info.run_id


def test_build_report_reads_the_family_from_the_study_file(store):
    values = {"base": BASE, **{v: [b + x for b, x in zip(BASE, d)] for v, d in DIFFS.items()}}
    old = build_report(_fake_study(store, values))  # study.json without the key: Holm
    assert old.multiple_comparisons == "holm"
    assert {r.variant: r.verdicts["fid_digits"].verdict for r in old.rows if not r.is_baseline} == {
        "a": INCONCLUSIVE, "b": INCONCLUSIVE, "c": INCONCLUSIVE}
    assert "Holm-adjusted over the 3 variants" in old.caption()
    none = build_report(_fake_study(store, values, spec_extra={"multiple_comparisons": "none",
                                                               "min_effect": {"fid_digits": 0.05}}))
    rows = {r.variant: r for r in none.rows}
    assert rows["a"].verdicts["fid_digits"].verdict == BETTER and none.min_effect == {"fid_digits": 0.05}
    assert rows["b"].verdicts["fid_digits"].seeds_needed > 4
    run_id = none.run_id
    none.log(Tracker(store, run_id))
    parent = store.get_run(run_id)
    assert parent.data.tags["verdict.a"] == "fid_digits: better (-0.065 ± 0.049)"
    assert parent.data.tags["mlflow.note.content"].startswith("- **a**: better on fid_digits (Δ -0.065 ± 0.049)\n")
    assert {"verdict.b.fid_digits.p", "verdict.b.fid_digits.mde", "verdict.b.fid_digits.seeds_needed"} <= set(
        parent.data.metrics) and "verdict.b.fid_digits.p_holm" not in parent.data.metrics


def test_build_report_until_decided_uses_the_seeds_each_variant_has(store):
    rng = np.random.default_rng(3)
    base = list(0.7 + rng.normal(0, 0.1, 8))
    fast = [b + d for b, d in zip(base, (-1.0, -1.02, -0.97, -1.01))]          # decided after the first round
    slow = [b + d for b, d in zip(base, rng.normal(0, 0.3, 8))]                # no effect: up to max seeds
    mid = [b + d for b, d in zip(base, rng.normal(0.1, 0.3, 6))]               # still open, its 7th seed failed
    run_id = _fake_study(store, {"base": base, "fast": fast, "slow": slow, "mid": mid},
                         tags={"study.mode": "until-decided", "study.max_seeds": "8"},
                         unfinished=[("mid", 6, "FAILED")])
    report = build_report(run_id)
    assert report.mode == UNTIL_DECIDED and report.max_seeds == 8 and report.seeds == 8
    rows = {r.variant: r for r in report.rows}
    assert {v: len(r.seeds) for v, r in rows.items()} == {"base": 8, "fast": 4, "slow": 8, "mid": 6}
    # fast's seeds 4-7 were never trained (decided): not missing; mid's failed seed 6 is
    assert report.missing == ["mid/seed6"]
    expected = sequential_verdicts({"fast": [a - b for a, b in zip(fast, base)], "slow": [a - b for a, b in zip(slow, base)],
                                    "mid": [a - b for a, b in zip(mid, base)]}, lower_is_better=True, max_seeds=8)
    for v in ("fast", "slow", "mid"):
        got = rows[v].verdicts["fid_digits"]
        assert isinstance(got, AnytimeVerdict) and got.family_size == 3
        assert (got.verdict, got.reason, got.n) == (expected[v].verdict, expected[v].reason, expected[v].n)
        assert got.low == pytest.approx(expected[v].low) and rows[v].stopped == expected[v].reason
    assert rows["fast"].stopped == "decided at n=4" and rows["slow"].stopped == "undecided at max seeds (8)"
    text = report.text()
    assert re.search(r"fast +4 +decided", text) and re.search(r"slow +8 +max seeds", text)
    assert "anytime-valid" in text and "No results yet for mid/seed6" in text
    json.dumps(report.to_dict(), allow_nan=False)  # summary.json: unbounded ends as null, strict JSON
