"""Plot and tabulate bench_full_softmax_libs.py results: one CSV per device and run.

Draws, per V, each provider's step time and extra peak memory (log scales) into a PNG, and
prints the markdown table the README's GPU section is made from (the device, torch version and
date come from the CSV's own rows, so a table is never detached from where it was measured).

    python bench/plot_side_by_side.py bench/results/side-by-side-<device>-<date>.csv [--png out.png]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from typing import Dict, List


def read(path: str) -> List[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("median_ms", "extra_peak_mb"):
            r[key] = float(r[key]) if r[key] not in ("", "nan") else math.nan
        r["num_classes"] = int(r["num_classes"])
    return rows


def table(rows: List[dict]) -> str:
    first = rows[0]
    lines = [f"{first['device']}, torch {first['torch']}, {first['date']}; N = {first['n']}, "
             f"D = {first['dim']}, {first['dtype']}, forward + backward of the output layer:", "",
             "| V | provider | ms | extra MB | time vs fused_nce nce | memory vs fused_nce nce | note |",
             "|---:|---|---:|---:|---:|---:|---|"]
    base: Dict[int, dict] = {r["num_classes"]: r for r in rows if r["provider"] == "fused_nce nce"}
    for r in rows:
        b = base.get(r["num_classes"])
        cells = []
        for key, digits in (("median_ms", 2), ("extra_peak_mb", 0)):
            cells.append("-" if math.isnan(r[key]) else f"{r[key]:.{digits}f}")
        for key in ("median_ms", "extra_peak_mb"):
            ok = b is not None and not math.isnan(r[key]) and b[key] > 0
            cells.append(f"{r[key] / b[key]:.1f}x" if ok else "-")
        lines.append(f"| {r['num_classes']:,} | {r['provider']} | " + " | ".join(cells)
                     + f" | {r['note']} |")
    return "\n".join(lines)


def plot(rows: List[dict], png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["num_classes"] for r in rows})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(sizes)
    for axis, key, label in ((axes[0], "median_ms", "forward + backward, ms"),
                             (axes[1], "extra_peak_mb", "extra peak memory, MB")):
        for i, v in enumerate(sizes):
            by = {r["provider"]: r for r in rows if r["num_classes"] == v}
            values = [by[p][key] if p in by else math.nan for p in providers]
            xs = [j + (i - (len(sizes) - 1) / 2) * width for j in range(len(providers))]
            axis.bar(xs, [0 if math.isnan(x) else x for x in values], width, label=f"V = {v:,}")
            for x, value in zip(xs, values):
                if math.isnan(value):
                    axis.text(x, 1, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        axis.set_yscale("log")
        axis.set_ylabel(label)
        axis.set_xticks(range(len(providers)))
        axis.set_xticklabels(providers, rotation=30, ha="right", fontsize=8)
        axis.legend(fontsize=8)
    first = rows[0]
    fig.suptitle(f"{first['device']}, torch {first['torch']}, {first['date']}: N = {first['n']}, "
                 f"D = {first['dim']}, {first['dtype']}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("--png", default=None, help="default: the CSV's path with .png")
    args = parser.parse_args()
    rows = read(args.csv)
    print(table(rows))
    plot(rows, args.png or os.path.splitext(args.csv)[0] + ".png")


if __name__ == "__main__":
    main()
