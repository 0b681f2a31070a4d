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
    from .models.registry import BLOCKS, MIXERS

    t = Table(title="block families (model.block = { family = ..., option = value })")
    t.add_column("family")
    t.add_column("option")
    t.add_column("type")
    t.add_column("default")
    t.add_column("meaning")
    for name, cls in BLOCKS.items():
        first = True
        for opt, (typ, default, doc) in cls.OPTIONS.items():
            t.add_row(name if first else "", opt, typ.__name__, repr(default), doc)
            first = False
        t.add_section()
    console.print(t)
    m = Table(title="channel mixers (option mixer = ...)")
    m.add_column("mixer")
    m.add_column("what it is")
    for name, _ in MIXERS.items():
        m.add_row(name, MIXERS.meta(name).get("doc", ""))
    console.print(m)
    console.print("Compute matching knobs (model.match_flops / --match): ratio, ffn_ratio, width")
