#!/usr/bin/env python3
"""Plots a drift-bench results.json: recall against queries/s (one curve per
index, over its knob) and recall against the drift step.

  python3 bench/plot.py bench/results/results.json   # writes the PNGs beside it
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path):
    with open(path) as f:
        r = json.load(f)
    out = os.path.dirname(os.path.abspath(path))
    c = r["config"]
    title = "N=%d, d=%d, k=%d, batch %d, %d threads" % (
        c["n"], c["dim"], c["k"], c["queries"], c["threads"])

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for curve in r["curves"]:
        ax.plot(curve["qps"], curve["recall"], marker="o", label=curve["index"])
    ax.set_xscale("log")
    ax.set_xlabel("queries/s (log)")
    ax.set_ylabel("recall@%d" % c["k"])
    ax.set_title("recall against throughput\n" + title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "recall_vs_qps.png"), dpi=120)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = [d for d in r["drift"] if "step" in d]
    steps = [d["step"] for d in points]
    ax.plot(steps, [d["stale"] for d in points], marker="o", label="static, never rebuilt")
    ax.plot(steps, [d["rebuilt_every_r"] for d in points], marker="o",
            label="static, rebuilt every %d steps" % c["rebuild_every"])
    for key in points[0] if points else []:
        if key.startswith("negmine"):
            ax.plot(steps, [d[key] for d in points], marker="o",
                    label=key + " (drift-corrected)")
    ax.set_xlabel("training step")
    ax.set_ylabel("recall@%d against the current model" % c["k"])
    ax.set_title("recall under drift\n" + title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "recall_vs_step.png"), dpi=120)
    print("wrote", os.path.join(out, "recall_vs_qps.png"), "and recall_vs_step.png")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/results.json")
