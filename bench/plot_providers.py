"""Plot bench_losses.py results: per path (negatives x objective), each provider's step time and
extra peak memory, side by side, into one PNG. The title names the machine, torch and date from
the CSV's own rows.

    python bench/plot_providers.py bench/results/cpu-x86_64-2threads-<date>.csv --png out.png
"""

from __future__ import annotations

import argparse
import csv
from typing import List

PROVIDERS = ["fused", "fused_sparse", "pytorch", "pytorch_compiled", "pytorch_autotuned",
             "pytorch_sparse"]
COLORS = {"fused": "#1f77b4", "fused_sparse": "#6baed6", "pytorch": "#d62728",
          "pytorch_compiled": "#ff7f0e", "pytorch_autotuned": "#bcbd22",
          "pytorch_sparse": "#9467bd"}


def read(path: str) -> List[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["median_ms"] = float(r["median_ms"])
        r["extra_peak_mb"] = float(r["extra_peak_mb"])
    return [r for r in rows if r["provider"] in PROVIDERS and r["mode"] != "-"]


def plot(rows: List[dict], png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = list(dict.fromkeys((r["mode"], r["objective"]) for r in rows))
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    by = {(r["mode"], r["objective"], r["provider"]): r for r in rows}
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(paths)), 7), sharex=True)
    width = 0.8 / len(providers)
    for ax, key, label in [(axes[0], "median_ms", "forward + backward, ms (log)"),
                           (axes[1], "extra_peak_mb", "extra peak memory, MB (log)")]:
        for p_index, provider in enumerate(providers):
            xs, ys = [], []
            for x, (mode, objective) in enumerate(paths):
                r = by.get((mode, objective, provider))
                if r is not None:
                    xs.append(x + (p_index - (len(providers) - 1) / 2) * width)
                    ys.append(max(r[key], 0.05))
            ax.bar(xs, ys, width, label=provider, color=COLORS[provider])
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(paths)))
    axes[1].set_xticklabels([f"{m}\n{o}" for m, o in paths], fontsize=8)
    axes[0].legend(ncol=3, fontsize=8)
    first = rows[0]
    fig.suptitle(f"{first['device']}, torch {first['torch']}, {first['date']}: N={first['n']}, "
                 f"D={first['dim']}, k={first['k']} (shared {first.get('shared_k', '-')}), "
                 f"V={first['num_classes']}, {first['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("csv")
    parser.add_argument("--png", required=True)
    args = parser.parse_args()
    plot(read(args.csv), args.png)


if __name__ == "__main__":
    main()
