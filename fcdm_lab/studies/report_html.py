"""A study report as one self-contained HTML page (`report/report.html` of the study's parent run).

    html = render_html(report)          # report = studies/report.py's build_report(run_id)
    write_html(report, "report/report.html")

What a researcher looks at first: one line per variant with its verdicts, the verdict table (the
table of report.md, coloured, with the family the verdicts are valid for), a forest plot
of each variant's paired difference to the baseline with its 95% interval against the noise floor,
each variant's evaluation samples side by side, and the training loss curves overlaid. Everything
comes from the Report (build_report fetched the histories and sample grids from MLflow); nothing
here talks to MLflow or recomputes a number.

One file, nothing external: plots and grids are inline base64 PNGs (matplotlib Agg), the CSS is
inline, no fonts or scripts are loaded from anywhere, because MLflow shows HTML artifacts in a
sandboxed iframe and the file must also open from disk or an email. All text goes through
html.escape. The one inline script only records, in a `data-images` attribute of <body>, whether
every image decoded (the browser test reads it); the page needs no script to display.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import List, Optional, Sequence

from .verdicts import BETTER, INCONCLUSIVE, NO_ERROR_BAR, WORSE

VERDICT_COLORS = {BETTER: "#1a7f37", WORSE: "#cf222e", INCONCLUSIVE: "#9a6700", NO_ERROR_BAR: "#57606a"}
VARIANT_COLORS = ("#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#1b7c83", "#bf3989", "#57606a",
                  "#9a6700", "#0550ae")

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; margin: 0;
       background: #f6f8fa; }
main { max-width: 1400px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 32px 0 8px; border-bottom: 1px solid #d0d7de;
     padding-bottom: 4px; }
.description { font-size: 17px; margin: 4px 0 10px; }
.facts { color: #57606a; margin: 0; } .facts b { color: #1f2328; font-weight: 600; }
.status { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 13px; font-weight: 600;
          background: #ddf4ff; color: #0969da; } .status.FINISHED { background: #dafbe1; color: #1a7f37; }
.status.FAILED, .status.KILLED { background: #ffebe9; color: #cf222e; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13.5px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 9px; border-bottom: 1px solid #d8dee4; text-align: right; white-space: nowrap; }
th { background: #f6f8fa; font-weight: 600; white-space: normal; vertical-align: bottom; } td:first-child, th:first-child { text-align: left; }
tr.baseline td { background: #f6f8fa; }
td.verdict { text-align: left; font-weight: 600; white-space: normal; min-width: 10em; }
ul.answer { margin: 12px 0 4px; padding-left: 20px; font-size: 15px; } ul.answer li { margin: 2px 0; }
details.note { margin-top: 6px; } details.note ul { padding-left: 20px; }
.caption, .note { color: #57606a; font-size: 13px; max-width: 1100px; }
figure { margin: 8px 0; } figure.plot img { max-width: 100%; height: auto; }
.grids { display: flex; flex-wrap: wrap; gap: 18px; }
.grids figure { margin: 0; text-align: center; }
.grids img { image-rendering: pixelated; width: 260px; height: auto; border: 1px solid #d0d7de; }
.grids figcaption { font-size: 13px; margin-top: 3px; } .grids figcaption b { font-size: 14px; }
.missing { width: 260px; height: 260px; display: flex; align-items: center; justify-content: center;
           border: 1px dashed #d0d7de; color: #57606a; background: #f6f8fa; }
"""

# Records whether every inline image decoded (naturalWidth > 0 after load): "ok N/N" or "broken K/N".
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", (ok === imgs.length ? "ok " : "broken ") + ok + "/" + imgs.length);
});
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def _interval(v):
    """(mean, low, high, n) of a verdict's paired difference: the 95% t-interval of verdicts.Verdict
    (low = high = None for one seed), the anytime-valid interval of report.AnytimeVerdict (None
    while unbounded); None without pairs."""
    if hasattr(v, "bounded"):  # report.AnytimeVerdict (not imported: report.py imports this module)
        if v.mean is None:
            return None
        return (v.mean, v.low, v.high, v.n) if v.bounded else (v.mean, None, None, v.n)
    if v.diff is None:
        return None
    return v.diff.mean, v.diff.low, v.diff.high, v.diff.n


def forest_plot(report) -> Optional[bytes]:
    """PNG: per non-baseline variant the paired difference of the primary metric to the baseline
    with its interval (the 95% t-interval; until-decided: the anytime-valid one), a line at 0, the
    noise floor (seed-to-seed sd pooled over variants) as a band around 0, colour by verdict (the
    Holm-adjusted or anytime-valid one); a variant without an interval (one paired seed, or an
    anytime-valid interval not yet bounded) is a hollow point without a bar. None when no variant
    has a paired difference."""
    primary = report.primary
    rows = [r for r in report.rows if not r.is_baseline and primary in r.verdicts
            and _interval(r.verdicts[primary]) is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.8, 0.62 * len(rows) + 1.9), dpi=110)
    floor = report.noise_floor().get(primary)
    if floor:
        ax.axvspan(-floor, floor, color="#8c959f", alpha=0.18, lw=0, label=f"noise floor (±{floor:.2g}, pooled seed sd)")
    ax.axvline(0.0, color="#1f2328", lw=1.0)
    labels, seen = [], set()
    # the legend shows a verdict by a point with a bar when it has one
    barred = {r.verdicts[primary].verdict for r in rows if _interval(r.verdicts[primary])[1] is not None}
    for y, r in enumerate(reversed(rows)):  # the report's order, top to bottom
        v = r.verdicts[primary]
        mean, low, high, n = _interval(v)
        color = VERDICT_COLORS.get(v.verdict, "#57606a")
        label = v.verdict if v.verdict not in seen and (low is not None or v.verdict not in barred) else None
        if label:
            seen.add(v.verdict)
        if low is None:  # n=1, or not yet bounded: the difference alone, no interval
            ax.plot([mean], [y], "o", mfc="white", mec=color, mew=1.8, ms=8, label=label)
        else:
            ax.errorbar([mean], [y], xerr=[[mean - low], [high - mean]], fmt="o", color=color, ms=7, capsize=5, lw=2,
                        label=label)
        labels.append(f"{r.variant} (n={n})" + (("\nno error bar" if n == 1 else "\nnot yet bounded")
                                                if low is None else ""))
    ax.set_yticks(range(len(rows)), labels)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.margins(x=0.15)
    arrow = "← better" if report.lower_is_better else "better →"
    ax.set_xlabel(f"Δ {primary} = variant − baseline ({report.baseline}), paired over seeds;   {arrow}")
    if report.until_decided:
        title = "Paired difference to the baseline, anytime-valid 95% interval"
    else:
        title = f"Paired difference to the baseline, 95% CI ({report.seeds} seed(s))"
    ax.set_title(title, fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    order = [*VERDICT_COLORS, names[0] if floor else None]  # better, worse, ..., then the band
    pairs = sorted(zip(handles, names), key=lambda p: order.index(p[1]) if p[1] in order else len(order))
    ax.legend(*zip(*pairs), loc="best", fontsize=8, frameon=False)
    fig.tight_layout()
    return _figure_png(fig)


def variant_color(report, variant: str) -> str:
    """One colour per variant, the same in the loss plot and the grid captions."""
    names = [r.variant for r in report.rows]
    return VARIANT_COLORS[names.index(variant) % len(VARIANT_COLORS)]


def loss_plot(report) -> Optional[bytes]:
    """PNG: every child's training loss history, thin lines per seed, one colour per variant
    (log scale when every value is positive). None when no child has a history."""
    series = [r for r in report.rows if r.loss_history]
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.8, 4.2), dpi=110)
    positive = True
    for r in series:
        color = variant_color(report, r.variant)
        for k, (seed, points) in enumerate(sorted(r.loss_history.items())):
            steps, values = [p[0] for p in points], [p[1] for p in points]
            positive = positive and all(v > 0 for v in values)
            ax.plot(steps, values, color=color, lw=0.9, alpha=0.75,
                    label=f"{r.variant} ({len(r.loss_history)} seed(s))" if k == 0 else None)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{report.loss_metric} (training, per logged window)")
    ax.set_title("Training loss, one thin line per seed", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _figure_png(fig)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

def _table(header: Sequence[str], cells: Sequence[Sequence[str]], *, row_classes: Sequence[str] = (),
           verdicts: Optional[Sequence[Sequence[Optional[str]]]] = None) -> str:
    """A table from already formatted cells; a verdict cell gets the verdict's colour: the word in
    `verdicts` (parallel to cells, Report.cell_verdicts), else a cell that is a signed number
    followed by a verdict word."""
    out = ['<div class="scroll"><table><thead><tr>', *[f"<th>{_e(h)}</th>" for h in header], "</tr></thead><tbody>"]
    for i, row in enumerate(cells):
        cls = row_classes[i] if i < len(row_classes) else ""
        out.append(f'<tr class="{_e(cls)}">' if cls else "<tr>")
        for j, c in enumerate(row):
            if verdicts is not None:
                word = verdicts[i][j] if verdicts[i][j] in VERDICT_COLORS else None
            else:
                word = next((w for w in VERDICT_COLORS if f" {w}" in c), None) if c[:1] in "+-" else None
            if word:
                out.append(f'<td class="verdict" style="color:{VERDICT_COLORS[word]}">{_e(c)}</td>')
            else:
                out.append(f"<td>{_e(c)}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _answer(report) -> str:
    """One line per variant, its verdicts first (Report.answer_lines, markdown bold made HTML)."""
    import re

    items = []
    for line in report.answer_lines():
        text = _e(line[2:] if line.startswith("- ") else line)
        items.append("<li>" + re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text, count=1) + "</li>")
    if not items:
        return ""
    family = report.family()
    tail = f'<p class="note">{_e(family[0].upper() + family[1:])}.</p>' if family else ""
    return f'<section id="answer"><ul class="answer">{"".join(items)}</ul>{tail}</section>'


def _img(png: bytes, alt: str, cls: str = "") -> str:
    return f'<img src="{png_data_uri(png)}" alt="{_e(alt)}"' + (f' class="{_e(cls)}"' if cls else "") + ">"


def _grids(report) -> str:
    out = ['<div class="grids">']
    for r in report.rows:
        name = f'<b style="color:{variant_color(report, r.variant)}">{_e(r.variant)}</b>' + (
            " (baseline)" if r.is_baseline else "")
        g = r.sample_grid
        if g is None:
            out.append(f'<figure class="grid"><div class="missing">no samples</div>'
                       f"<figcaption>{name}</figcaption></figure>")
        else:
            out.append(f'<figure class="grid">{_img(g.png, f"evaluation samples of {r.variant}, seed {g.seed}")}'
                       f"<figcaption>{name} · seed {g.seed} · step {g.step}</figcaption></figure>")
    out.append("</div>")
    return "".join(out)


def _plot_section(title: str, png: Optional[bytes], alt: str, note: str, empty: str, section_id: str) -> str:
    body = (f'<figure class="plot">{_img(png, alt)}</figure><p class="note">{_e(note)}</p>' if png is not None
            else f'<p class="note">{_e(empty)}</p>')
    return f'<section id="{section_id}"><h2>{_e(title)}</h2>{body}</section>'


def render_html(report) -> str:
    """The whole page as a string (see the module docstring)."""
    title = f"Study {report.study}"
    facts = [("status", None), ("baseline", report.baseline), ("primary metric", report.primary),
             ("seeds", str(report.seeds)), ("training steps per child", str(report.steps or "as configured")),
             ("MLflow run", report.run_id)]
    fact_html = " · ".join(
        f'<span class="status {_e(report.status)}">{_e(report.status)}</span>' if v is None else f"{_e(k)} <b>{_e(v)}</b>"
        for k, v in facts)
    parts: List[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{_e(title)}</h1>",
    ]
    if report.description:
        parts.append(f'<p class="description">{_e(report.description)}</p>')
    parts.append(f'<p class="facts">{fact_html}</p>')
    parts.append(_answer(report))

    # the verdict table: the very cells of report.md (Report.header/cells/caption)
    row_classes = ["baseline" if r.is_baseline else "" for r in report.rows]
    parts += ['<section id="verdicts"><h2>Verdicts</h2>',
              _table(report.header(), report.cells(), row_classes=row_classes, verdicts=report.cell_verdicts()),
              f'<p class="caption">{_e(report.caption())}.</p></section>']
    words = report.verdicts_in_words()
    if words:
        what = "" if report.until_decided else " (p-values, MDE, seeds)"
        parts += [f'<details class="note"><summary>Verdicts in words{what}</summary><ul>',
                  *[f"<li>{_e(w[2:])}</li>".replace("**", "") for w in words], "</ul></details>"]
    cmp = report.paper_comparison
    if cmp is not None:
        parts += ['<section id="paper"><h2>Against the paper\'s ablation table</h2>',
                  f'<p class="note">{_e(cmp.summary())}</p>', _table(cmp.header(), cmp.cells()), "</section>"]

    floor = report.noise_floor().get(report.primary)
    shown = {r.variant: _interval(r.verdicts[report.primary]) for r in report.rows
             if not r.is_baseline and report.primary in r.verdicts}
    hollow = [v for v, i in shown.items() if i is not None and i[1] is None]
    family = report.family()
    if report.until_decided:
        note = ("Each bar: the mean over seeds of (variant − baseline) with its anytime-valid 95% interval (valid "
                "however often seeds were added); a verdict is better / worse when the interval excludes 0. ")
    else:
        note = "Each bar: the mean over seeds of (variant − baseline) with its 95% t-interval (unadjusted); "
        note += (f"the colour is the verdict, {family}, so a bar that clears 0 can stay inconclusive. " if family
                 and report.multiple_comparisons != "none" and len(shown) > 1
                 else "a verdict is better / worse only when the interval excludes 0. ")
    note += (f"Grey band: ± the seed-to-seed sd pooled over the variants ({floor:.2g}), the noise floor. " if floor
             else "No noise floor: it needs at least 2 seeds of a variant. ")
    if hollow and report.until_decided:
        note += f"Hollow points ({', '.join(hollow)}): too few seeds for a bounded interval yet."
    elif hollow:
        note += f"Hollow points ({', '.join(hollow)}): one paired seed, so no error bar and no verdict."
    parts.append(_plot_section(f"Forest plot: Δ {report.primary} against the baseline", forest_plot(report),
                               f"forest plot of the paired differences in {report.primary}", note,
                               "No variant has a paired difference to the baseline yet.", "forest"))

    parts += ['<section id="samples"><h2>Evaluation samples</h2>',
              '<p class="note">One seed per variant (the lowest with samples), the evaluation grid logged to its run '
              "(MLflow image key eval_samples); the same seed means the same evaluation noise across variants.</p>",
              _grids(report), "</section>"]

    parts.append(_plot_section("Training loss", loss_plot(report), "training loss curves of every child run",
                               f"MLflow metric {report.loss_metric!r} of every finished child, as logged during "
                               "training (a mean over each logging window).",
                               "No loss history logged by the children.", "loss"))
    if report.missing:
        parts.append(f'<p class="note">No results yet for {_e(", ".join(report.missing))}.</p>')
    parts.append(f"</main><script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def write_html(report, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path


__all__ = ["forest_plot", "loss_plot", "render_html", "write_html"]
