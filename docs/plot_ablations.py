"""Table and plot of NEPA ablation runs: loss and collapse monitor (pred_std) per step, and the probes each run's
results.json reports (middle block, pretrained vs random init).

    python docs/plot_ablations.py --out docs/figures/c10_ablations.png \
        "official=runs/abl/default" "no shift=runs/abl/no_shift" "no stop-grad=runs/abl/no_stopgrad" \
        "bidirectional=runs/abl/bidirectional" "mask 40%=runs/abl/mask40"
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    fig, (ax_loss, ax_std) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=120)
    print("| row | final loss | pred_std at the end | kNN pretrained / random | linear pretrained / random |")
    print("|---|---|---|---|---|")
    for item in args.runs:
        label, run = item.split("=", 1)
        rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").open()]
        rows = [r for r in rows if r.get("split") == "train" and "loss" in r]
        steps = [r["step"] for r in rows]
        ax_loss.plot(steps, [r["loss"] for r in rows], label=label)
        ax_std.plot(steps, [r["pred_std"] for r in rows], label=label)
        probe = next(iter(json.loads((Path(run) / "results.json").read_text())["probes"].values()))
        print(f"| {label} | {rows[-1]['loss']:.3f} | {rows[-1]['pred_std']:.4f} | "
              f"{probe['knn_pretrained']:.1f} / {probe['knn_random_init']:.1f} | "
              f"{probe['linear_pretrained']:.1f} / {probe['linear_random_init']:.1f} |")
    ax_loss.set(xlabel="step", ylabel="training loss (negative cosine)", title="loss")
    ax_std.set(xlabel="step", ylabel="pred_std", title="collapse monitor (0 = collapsed)", yscale="log")
    ax_loss.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out)


if __name__ == "__main__":
    main()
