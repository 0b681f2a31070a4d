"""Rich tables for the CLI (formatting only; the numbers come from the library)."""
from __future__ import annotations

import io
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.table import Table
from rich.text import Text


VERDICT_STYLES = {"better": "green", "worse": "red", "inconclusive": "yellow"}
REPORT_WIDTH = 120   # studies/report.py TABLE_WIDTH: the study table fits a 120-column terminal


def output_console(stderr: bool = False) -> Console:
    """The console every command prints with: a terminal's own width; elsewhere (a log file, a pipe,
    a scheduler job's stdout) REPORT_WIDTH columns unless COLUMNS says otherwise, where rich would
    take 80 and break study tables, paths and run ids over several lines."""
    console = Console(stderr=stderr)
    if not (console.is_terminal or console.is_jupyter) and not os.environ.get("COLUMNS"):
        console.width = REPORT_WIDTH
    return console


def short_path(path) -> str:
    """A path as printed: relative to the working directory when inside it (a 120-column line keeps
    the file name; the absolute path of a study folder alone can pass 120), else as given."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def report_files_line(paths) -> str:
    """'Report: <report.html> (also report.md, ...)': where a study's report was written, in one line."""
    return f"Report: {short_path(paths['html'])} (also {', '.join(p.name for k, p in paths.items() if k != 'html')})"


def fmt_params(n: int | None) -> str:
    """A parameter count in a few characters, for tables: '1.31M', '640.0k', '950' ('-' when unknown)."""
    if n is None:
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _block_label(row: Dict[str, Any]) -> str:
    blk = row.get("block")
    if not blk:
        return "-"
    from .models.blocks import BLOCKS

    defaults = {k: d for k, (_, d, _) in BLOCKS.get(blk["family"]).OPTIONS.items()}
    diff = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in blk.items() if k != "family" and defaults.get(k) != v]
    return blk["family"] + (f" ({', '.join(diff)})" if diff else "")


def print_profile_table(rows: List[Dict[str, Any]], console: Console) -> None:
    groups: "OrderedDict[str, List[Dict[str, Any]]]" = OrderedDict()
    for r in rows:
        groups.setdefault(r.get("variant") or r["model"], []).append(r)
    resolutions = sorted({r["resolution"] for r in rows})
    multi = len(resolutions) > 1
    throughput = any("train_img_per_s" in r for r in rows)
    matched = any("match" in r for r in rows)

    t = Table(title="fcdm-lab profile" + (f" (device {rows[0].get('device')}, batch {rows[0].get('batch_size')})" if throughput else ""))
    t.add_column("model / variant")
    t.add_column("L, C")
    t.add_column("block")
    t.add_column("params (exact in --json)", justify="right")
    if multi:
        for res in resolutions:
            t.add_column(f"GMACs @{res}", justify="right")
            if throughput:
                t.add_column(f"train img/s @{res}", justify="right")
    else:
        t.add_column(f"GMACs @{resolutions[0]}", justify="right")
        t.add_column("paper", justify="right")
        t.add_column("diff", justify="right")
        if throughput:
            t.add_column("train img/s", justify="right")
            t.add_column("infer img/s", justify="right")
            t.add_column("peak MB", justify="right")
    if matched:
        t.add_column("compute matching")

    for label, group in groups.items():
        first = group[0]
        lc = f"{first['L']}, {first['C']}" if "L" in first else "-"
        cells = [label, lc, _block_label(first), fmt_params(first["params"])]
        if multi:
            by_res = {r["resolution"]: r for r in group}
            base = by_res.get(resolutions[0])
            for res in resolutions:
                r = by_res.get(res)
                if r is None:
                    cells += ["-"] + (["-"] if throughput else [])
                    continue
                growth = f" (x{r['gmacs'] / base['gmacs']:.2f})" if base and res != resolutions[0] else ""
                cells.append(f"{r['gmacs']:.3f}{growth}")
                if throughput:
                    drop = f" (/{base['train_img_per_s'] / r['train_img_per_s']:.2f})" if base and res != resolutions[0] else ""
                    cells.append(f"{r['train_img_per_s']:.1f}{drop}")
        else:
            paper = first.get("paper_gmacs")
            cells += [f"{first['gmacs']:.3f}", f"{paper}" if paper else "-",
                      f"{100 * (first['gmacs'] - paper) / paper:+.2f}%" if paper else "-"]
            if throughput:
                cells += [f"{first['train_img_per_s']:.1f}", f"{first['infer_img_per_s']:.1f}", f"{first['peak_mem_mb']:.0f}"]
        if matched:
            m = first.get("match")
            cells.append(
                f"{m['knob']} {m['from_value']:.4g}->{m['to_value']:.4g} {100 * m['rel_err']:+.2f}%"
                + ("" if m["matched"] else " NOT within 1%") if m else "-")
        t.add_row(*cells)
    console.print(t)
    if multi and throughput:
        console.print("Growth is relative to the first resolution: GMACs (xN) and training throughput (/N slower).")


def print_blocks(console: Console) -> None:
    """`fcdm-lab blocks`: every block family and channel mixer with its declared options."""
    from .models.blocks import MixerSpec
    from .models.registry import BLOCKS, MIXERS

    def type_name(typ) -> str:
        return "mixer" if typ == MixerSpec else getattr(typ, "__name__", str(typ))

    t = Table(title="block families (model.block = { family = ..., option = value })")
    t.add_column("family")
    t.add_column("option")
    t.add_column("type")
    t.add_column("default")
    t.add_column("meaning")
    for name, cls in BLOCKS.items():
        first = True
        for opt, (typ, default, doc) in cls.OPTIONS.items():
            t.add_row(name if first else "", opt, type_name(typ), repr(default), doc)
            first = False
        t.add_section()
    console.print(t)
    m = Table(title='channel mixers (mixer = "name", or mixer = { name = "name", option = value })')
    m.add_column("mixer")
    m.add_column("what it is")
    m.add_column("option")
    m.add_column("type")
    m.add_column("default")
    m.add_column("meaning")
    for name, cls in MIXERS.items():
        options = list(getattr(cls, "OPTIONS", {}).items()) or [(None, (None, None, ""))]
        for i, (opt, (typ, default, doc)) in enumerate(options):
            m.add_row(name if i == 0 else "", MIXERS.meta(name).get("doc", "") if i == 0 else "",
                      opt or "-", type_name(typ) if opt else "", repr(default) if opt else "", doc)
        m.add_section()
    console.print(m)
    console.print("Compute matching knobs (model.match_flops / --match): ratio, ffn_ratio, width")


# ---------------------------------------------------------------------------------------------
# Studies and sweeps
# ---------------------------------------------------------------------------------------------

def print_wide(console: Console, table, max_width: Optional[int] = None) -> None:
    """Print a table; into a file or pipe at its natural width (at most `max_width` columns, when
    given) instead of wrapped to the console's 80 columns. A console already wider stays as it is."""
    if console.is_terminal:
        console.print(table)  # rich folds cells to the terminal's width
        return
    old = console.width
    natural = console.measure(table, options=console.options.update_width(1000)).maximum
    if max_width is not None:
        natural = min(natural, max_width)
    console.width = max(old, natural)
    try:
        console.print(table)
    finally:
        console.width = old


def table_text(table, width: int = 200) -> str:
    """A rich table as plain text (what the terminal shows)."""
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(table)
    return console.export_text()


def studies_table(specs, sweeps=()) -> Table:
    """Every bundled study and sweep (what `fcdm-lab ablate` with no name prints): its name (never
    cut), what it asks, its variants and seeds, and its wall time as measured (the file's
    `wall_time`), in 120 columns."""
    from rich import box

    t = Table(title="Studies: fcdm-lab ablate NAME  |  sweeps: fcdm-lab sweep NAME", box=box.SIMPLE_HEAD,
              title_justify="left")
    t.add_column("name", no_wrap=True)
    t.add_column("what it asks (variants; * = baseline)", overflow="fold", ratio=1)
    t.add_column("seeds", justify="right")
    t.add_column("wall time", overflow="fold", max_width=24)
    for s in specs:
        names = [f"{v.name}*" if v.name == s.baseline else v.name for v in s.variants]
        t.add_row(s.name, f"{s.description} ({', '.join(names)})", str(s.seeds), s.wall_time or "-")
    for s in sweeps:
        t.add_row(s.name, f"{s.description} (sweep: {', '.join(p.name for p in s.space)})",
                  str(getattr(s, "seeds", 1) or 1), s.wall_time or "-")
    return t




def _compact_report_table(report, columns, caption: str, width: int) -> Table:
    from rich import box

    title = f"Study {report.study}: {report.description}" if report.description else f"Study {report.study}"
    # at least 80 columns (or the width), so that the title and caption of a one-metric study do not wrap
    # into a narrow strip; Text: no markup in the study's words
    t = Table(title=Text(title), caption=Text(caption), box=box.SIMPLE_HEAD, title_justify="left",
              caption_justify="left", show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), min_width=min(width, 80))
    for c in columns:  # fold, never cut: a truncated number is a wrong number
        t.add_column(c.header, justify=c.justify, overflow="fold")
    for i in range(len(report.rows)):
        cells = []
        for c in columns:
            word = c.verdicts[i] if c.verdicts else None
            text = Text(c.cells[i])
            if word in VERDICT_STYLES:
                text.stylize(VERDICT_STYLES[word])
            cells.append(text)
        t.add_row(*cells)
    return t


def report_table(report, width: int = REPORT_WIDTH) -> Table:
    """A study report (studies/report.py) as the compact terminal table: variant, n, params, GMACs,
    each metric's mean and each metric's short verdict cell (coloured), with a short caption, title
    and caption left-aligned. The most complete of report.compact's levels whose natural width fits
    `width` (the last one otherwise: rich folds it); the full table is report.md / report.html's."""
    measure = Console(file=io.StringIO(), width=1000)
    table = None
    for level in range(len(report.compact_levels)):
        table = _compact_report_table(report, *report.compact(level), width)
        if measure.measure(table).maximum <= width:
            break
    return table


AGREEMENT_STYLES = {"agrees": "green", "disagrees": "red"}


def paper_table(cmp) -> Table:
    """A study's ordering against the paper's table (studies/paper.py): agreement cells coloured."""
    from rich import box

    t = Table(title="Against the paper's ablation table", caption=Text(cmp.summary()), box=box.SIMPLE_HEAD,
              title_justify="left", caption_justify="left")
    for i, h in enumerate(cmp.header()):
        t.add_column(h, justify="left" if i in (0, 5, 6) else "right", overflow="fold")
    for row in cmp.cells():
        t.add_row(*row[:-1], f"[{AGREEMENT_STYLES[row[-1]]}]{row[-1]}[/]" if row[-1] in AGREEMENT_STYLES else row[-1])
    return t


def sweep_table(rows: List[Dict[str, Any]], title: str, fmt) -> Table:
    """The trials of a sweep (studies/sweep.py): Pareto-optimal / best rows bold green."""
    table = Table(title=title, title_justify="left")
    columns = [c for c in (rows[0] if rows else {}) if c not in ("run_id", "error")
               and (c != "note" or any(r["note"] for r in rows))]
    for c in columns:
        table.add_column(c, justify="left" if c == "state" else "right")
    styles = {"COMPLETE": "", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan", "WAITING": "dim"}
    for r in rows:
        table.add_row(*(fmt(r[c]) for c in columns), style="bold green" if r["pareto"] else styles.get(r["state"], ""))
    return table
