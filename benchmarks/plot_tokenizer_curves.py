"""Chart of tokenizer runs on the shapes world: held-out renderer attribute preservation, per-object shape
accuracy and PSNR against training images seen, one line per run, and the per-shape confusion table (true
shape × read shape) of the first run's last evaluation (with ``--chain``, of the last run's).

    python benchmarks/plot_tokenizer_curves.py --run "full recipe=runs/tokenizer_shapes_full" \
        --run "quick recipe=runs/tokenizer_shapes" --out docs/tokenizer_curves.png
    python benchmarks/plot_tokenizer_curves.py --chain --run "refine, shape 0.3=runs/a" \
        --run "refine, shape 1.0=runs/b" --out docs/tokenizer_refine.png   # b continues a (init.tokenizer)

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


def plot(runs: dict[str, list[dict]], out: Path, chain: bool = False) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6), gridspec_kw={"width_ratios": [1, 1, 1, 0.9]})
    for label, pts in runs.items():
        x = [p["images_seen"] / 1000 for p in pts]
        axes[0].plot(x, [p.get("attribute_preservation") for p in pts], "o-", label=label)
        axes[1].plot(x, [p.get("shape_accuracy") for p in pts], "o-", label=label)
        axes[2].plot(x, [p["psnr"] for p in pts], "o-", label=label)
    lows = [p.get(k) for pts in runs.values() for p in pts for k in ("attribute_preservation", "shape_accuracy")]
    low = min([v for v in lows if v is not None] + [0.9])
    bottom = 0 if low < 0.5 else 0.8  # refinements move in the last few hundredths: zoom in
    for ax, bar, name, title in ((axes[0], 0.90, "attribute preservation", "every object's shape, colour, "
                                  "count, position"), (axes[1], 0.97, "shape accuracy", "each object's shape")):
        ax.axhline(bar, color="grey", ls="--", lw=1)
        ax.set(xlabel="training images seen (k)", ylabel=f"{name} (held-out)", ylim=(bottom, 1),
               title=f"renderer: {title}")
    axes[2].axhline(27, color="grey", ls="--", lw=1)
    axes[2].set(xlabel="training images seen (k)", ylabel="PSNR (dB, held-out)", title="renderer PSNR")
    axes[0].legend(fontsize=8)
    table_label, table_run = list(runs.items())[-1 if chain else 0]
    last = table_run[-1]
    table = last.get("shape_confusion")
    ax = axes[3]
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
               title=f"{table_label}\n{last['stage']} step {last['step']}: shape accuracy "
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
                    help="a training run directory and its legend label (repeatable; the first gives the table, "
                         "with --chain the last)")
    ap.add_argument("--out", type=Path, default=Path("docs/tokenizer_curves.png"))
    ap.add_argument("--chain", action="store_true",
                    help="each run continues the one before (init.tokenizer): its images seen start where that "
                         "one's end; the confusion table is the last run's")
    args = ap.parse_args()
    runs, start = {}, 0
    for item in args.run:
        label, sep, directory = item.partition("=")
        if not sep:
            ap.error(f"--run {item!r}: expected LABEL=DIR")
        runs[label] = [{**p, "images_seen": p["images_seen"] + start} for p in renderer_curve(Path(directory))]
        if args.chain:
            start = runs[label][-1]["images_seen"]
        for p in runs[label]:
            print(f"{label}: {p['stage']} step {p['step']}: {p['images_seen']} images, PSNR {p['psnr']:.2f}, "
                  f"attributes {p.get('attribute_preservation', float('nan')):.3f}, "
                  f"shape accuracy {p.get('shape_accuracy', float('nan')):.3f}")
    plot(runs, args.out, args.chain)


if __name__ == "__main__":
    main()
