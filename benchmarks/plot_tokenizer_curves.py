"""Chart of tokenizer runs on the shapes world: held-out renderer attribute preservation and PSNR against
training images seen, one line per run, and the per-shape confusion table (true shape × read shape) of the
first run's last evaluation.

    python benchmarks/plot_tokenizer_curves.py --run "full recipe=runs/tokenizer_shapes_full" \
        --run "quick recipe=runs/tokenizer_shapes" --out docs/tokenizer_curves.png

Reads each run's pinned ``config.yaml`` (batch sizes) and its ``eval/stage{1,2}_step*.json`` files (stage 1's
joint renderer: ``stage1_stepN_renderer.json``; stage 2 trains the renderer alone). Images seen count the
stage-1 and stage-2 batches (stage 0, the autoencoder, is not counted: it sees pixels, not tokens).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

TAG = re.compile(r"^(stage[12])_step(\d+)(_renderer)?\.json$")


def renderer_curve(run: Path) -> list[dict]:
    """The run's renderer evaluations in training order, each with ``images_seen`` added."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    batch = {s: cfg[s]["batch_size"] for s in ("stage1", "stage2")}
    joint = bool(cfg["stage1"].get("renderer_weight"))
    points = []
    for path in (run / "eval").glob("stage*_step*.json"):
        m = TAG.match(path.name)
        if not m or (m[1] == "stage1" and not (joint and m[3])):
            continue
        stage, step = m[1], int(m[2])
        seen = step * batch[stage] + (cfg["stage1"]["steps"] * batch["stage1"] if stage == "stage2" else 0)
        points.append({**json.loads(path.read_text()), "stage": stage, "step": step, "images_seen": seen})
    if not points:
        raise SystemExit(f"{run}: no renderer evaluations under {run / 'eval'}")
    return sorted(points, key=lambda p: p["images_seen"])


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [1, 1, 0.9]})
    for label, pts in runs.items():
        x = [p["images_seen"] / 1000 for p in pts]
        axes[0].plot(x, [p.get("attribute_preservation") for p in pts], "o-", label=label)
        axes[1].plot(x, [p["psnr"] for p in pts], "o-", label=label)
    axes[0].axhline(0.90, color="grey", ls="--", lw=1)
    axes[0].set(xlabel="training images seen (k)", ylabel="attribute preservation (held-out)", ylim=(0, 1),
                title="renderer: every object's shape, colour, count, position")
    axes[1].axhline(27, color="grey", ls="--", lw=1)
    axes[1].set(xlabel="training images seen (k)", ylabel="PSNR (dB, held-out)", title="renderer PSNR")
    axes[0].legend(fontsize=8)
    first_label, first = next(iter(runs.items()))
    last = first[-1]
    table = last.get("shape_confusion")
    ax = axes[2]
    if table:
        rows, cols = list(table), list(next(iter(table.values())))
        counts = [[table[r][c] for c in cols] for r in rows]
        ax.imshow([[v / max(sum(row), 1) for v in row] for row in counts], cmap="Blues", vmin=0, vmax=1)
        for i, row in enumerate(counts):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(cols)), cols, rotation=30)
        ax.set_yticks(range(len(rows)), rows)
        ax.set(xlabel="read shape", ylabel="true shape",
               title=f"{first_label}, {last['stage']} step {last['step']}: shape accuracy "
                     f"{last.get('shape_accuracy', float('nan')):.3f}")
    else:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=DIR",
                    help="a training run directory and its legend label (repeatable; the first gives the table)")
    ap.add_argument("--out", type=Path, default=Path("docs/tokenizer_curves.png"))
    args = ap.parse_args()
    runs = {}
    for item in args.run:
        label, sep, directory = item.partition("=")
        if not sep:
            ap.error(f"--run {item!r}: expected LABEL=DIR")
        runs[label] = renderer_curve(Path(directory))
        for p in runs[label]:
            print(f"{label}: {p['stage']} step {p['step']}: {p['images_seen']} images, PSNR {p['psnr']:.2f}, "
                  f"attributes {p.get('attribute_preservation', float('nan')):.3f}, "
                  f"shape accuracy {p.get('shape_accuracy', float('nan')):.3f}")
    plot(runs, args.out)


if __name__ == "__main__":
    main()
