"""Plot fine-tuned top-1 against NEPA pretraining budget from finetune results.json files.

    python docs/plot_budget.py --out docs/figures/c10_budget.png \
        0=runs/c10_ft_scratch 150=runs/c10_ft_pt150 300=runs/c10_ft_pt300 600=runs/c10_ft_pt600
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", help="STEPS=RUN_DIR (0 for the from-scratch baseline)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    pts = []
    for item in args.runs:
        steps, run = item.split("=", 1)
        final = json.loads((Path(run) / "results.json").read_text())["final"]
        pts.append((int(steps), final["top1"], final.get("ema_top1")))
    pts.sort()
    fig, ax = plt.subplots(figsize=(4.6, 3.2), dpi=120)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="raw weights")
    if all(p[2] is not None for p in pts):
        ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", label="EMA weights")
    ax.set_xlabel("NEPA pretraining steps (batch 256); 0 = from scratch")
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out)
    for s, a, e in pts:
        print(f"{s:>5} steps: top-1 {a:.2f}  ema {e if e is None else round(e, 2)}")


if __name__ == "__main__":
    main()
