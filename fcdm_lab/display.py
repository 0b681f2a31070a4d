"""Rich tables for the CLI (formatting only; the numbers come from the library)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List

from rich.console import Console
from rich.table import Table


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


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
        cells = [label, lc, _block_label(first), _fmt_params(first["params"])]
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

def print_wide(console: Console, table) -> None:
    """Print a table; into a file or pipe at its natural width instead of wrapped to 80 columns."""
    if console.is_terminal:
        console.print(table)  # rich folds cells to the terminal's width
        return
    old = console.width
    console.width = max(old, console.measure(table, options=console.options.update_width(1000)).maximum)
    try:
        console.print(table)
    finally:
        console.width = old


def table_text(table, width: int = 200) -> str:
    """A rich table as plain text (what the terminal shows)."""
    import io

    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(table)
    return console.export_text()


def studies_table(specs) -> Table:
    """The bundled studies (what `fcdm-lab ablate` with no name prints)."""
    t = Table(title="Studies (run one: fcdm-lab ablate NAME)")
    for col in ("study", "description", "variants", "base", "seeds", "steps"):
        t.add_column(col)
    for s in specs:
        names = [f"{v.name}*" if v.name == s.baseline else v.name for v in s.variants]
        t.add_row(s.name, s.description, ", ".join(names), s.base, str(s.seeds), str(s.steps or "-"))
    return t


VERDICT_STYLES = {"better": "green", "worse": "red", "inconclusive": "yellow"}


def report_table(report) -> Table:
    """A study report (studies/report.py) as a rich table: verdict cells coloured."""
    from rich import box

    t = Table(title=f"Study {report.study}: {report.description}" if report.description else f"Study {report.study}",
              caption=report.caption(), box=box.SIMPLE_HEAD)
    for i, h in enumerate(report.header()):  # fold, never cut: a truncated number is a wrong number
        t.add_column(h, justify="left" if i in (0, 4) or h.startswith("Δ") else "right", overflow="fold")
    for row in report.cells():
        t.add_row(*[next((f"[{style}]{c}[/]" for word, style in VERDICT_STYLES.items() if f" {word}" in c), c)
                    if c[:1] in "+-" else c for c in row])
    return t


AGREEMENT_STYLES = {"agrees": "green", "disagrees": "red"}


def paper_table(cmp) -> Table:
    """A study's ordering against the paper's table (studies/paper.py): agreement cells coloured."""
    from rich import box

    t = Table(title="Against the paper's ablation table", caption=cmp.summary(), box=box.SIMPLE_HEAD)
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
