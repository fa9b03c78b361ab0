"""The demo's report (scripts.demo): report.json, report.md (a one-page story) and PNG grids.

Every number is read from what the stages wrote; the one computed here is RL's paired change, from the two
evaluations' per-image verdicts (the same prompts and seeds):

    tokenizer.*          tokenizer/eval/<stage>_step<N>.json   (selftok.train's held-out evaluation, last step)
    vlm.geneval_heldout  vlm_eval/summary.json                 (vlm.generate evaluate: 96 held-out prompts)
    vlm.caption_accuracy vlm_eval/summary.json                 (captions of held-out scenes judged true)
    vlm.caption_accuracy_seen  vlm_eval/summary.json           (captions of new scenes of training compositions)
    rl.geneval_heldout   rl_eval/summary.json                  (the same prompts and seeds after RL)
    rl.change_vs_vlm     {vlm,rl}_eval/t2i_report.json         (after − before, paired standard error)
    timing.<stage>       stages/<stage>.done.json              (seconds, all attempts of the stage)

A stage that has not run leaves its keys out and is listed under ``missing``; ``complete`` is true only when
every stage finished.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw, ImageFont

from scripts.demo.config import DemoConfig
from scripts.demo.runner import Stage
from selftok.runtime.config import to_dict
from selftok.runtime.io import read_json, write_atomic
from selftok.shapes import CATEGORIES, heldout_prompts, make_example, paired_change
from selftok.training.evaluation import last_evaluations

log = logging.getLogger("demo")

#: The issue's acceptance bars for the full demo on a 2-core CPU (dotted key, comparison, bar).
ACCEPTANCE = (
    ("tokenizer.attribute_preservation", ">=", 0.90),
    ("vlm.geneval_heldout.overall", ">=", 0.40),
    ("vlm.caption_accuracy", ">=", 0.80),
    ("rl.change_vs_vlm.change", ">=", 0.10),
    ("rl.change_vs_vlm.standard_error", "<=", 0.03),
    ("rl.largest_category_drop", "<=", 0.05),
    ("timing.total", "<=", 40 * 60),
)
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "peft", "trl", "diffusers", "safetensors",
            "numpy", "pillow", "sentencepiece", "selftok-stack")
GOOD, BAD, INK = (30, 140, 60), (200, 40, 40), (20, 20, 20)


# ------------------------------------------------------------------------------------------------ reading
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def get(data: dict[str, Any], dotted: str) -> Any:
    """`data["a"]["b"]` for "a.b" (None when absent): report.json's dotted names address nested objects."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def tokenizer_evals(out: Path) -> dict[str, tuple[int, Path]]:
    """{stage1|stage2: (step, json path)} of the newest held-out evaluation of each training stage."""
    return {stage: (step, main) for stage, (step, files) in last_evaluations(out / "tokenizer" / "eval").items()
            for main in files if stage in ("stage1", "stage2") and main.name == f"{stage}_step{step}.json"}


def tokenizer_section(out: Path) -> dict[str, Any] | None:
    """The final tokenizer's held-out figures (renderer if trained, else the diffusion decoder)."""
    evals = tokenizer_evals(out)
    if not evals:
        return None
    parts = {}
    for stage, (step, path) in sorted(evals.items()):
        m = read_json(path) or {}
        parts["renderer" if stage == "stage2" else "decoder"] = {**m, "step": step}
    final = parts.get("renderer") or parts["decoder"]
    return {"psnr": final.get("psnr"), "attribute_preservation": final.get("attribute_preservation"),
            "codebook_usage": final.get("codes_used_fraction"), "ssim": final.get("ssim"),
            "measured_with": "renderer" if "renderer" in parts else "decoder", **parts}


def eval_section(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    t2i = summary.get("t2i", {})
    section: dict[str, Any] = {"geneval_heldout": {"overall": t2i.get("overall"), **t2i.get("per_category", {})},
                               "overall_standard_error": t2i.get("overall_standard_error"),
                               "n_images": t2i.get("n_images")}
    if "captions" in summary:
        section["caption_accuracy"] = summary["captions"].get("accuracy")
        section["caption_exact_match"] = summary["captions"].get("exact_match")
        section["captions_per_category"] = summary["captions"].get("per_category")
        section["captions_per_heldout_kind"] = summary["captions"].get("per_heldout_kind")
    if "captions_seen" in summary:
        section["caption_accuracy_seen"] = summary["captions_seen"].get("accuracy")
        section["captions_seen_per_category"] = summary["captions_seen"].get("per_category")
    return section


def rl_change(out: Path) -> dict[str, Any] | None:
    """Held-out `overall` after RL − before, paired over the same images (None if a report is unreadable)."""
    before, after = (read_json(out / d / "t2i_report.json") for d in ("vlm_eval", "rl_eval"))
    if not before or not after:
        return None
    try:
        return paired_change(before["images"], after["images"])
    except (KeyError, ValueError) as e:
        log.warning("no paired RL change: %s", e)
        return None


def training_summary(run_dir: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """Steps and the last logged values of `keys` from a run's metrics.jsonl (resumed steps: last write wins)."""
    rows = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "step" in r}
    if not rows:
        return {}
    last = rows[max(rows)]
    return {"steps": max(rows), **{k: last[k] for k in keys if k in last}}


def versions(repo: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "cpu_count": os.cpu_count()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["git_commit"] = git_commit(repo)
    return out


def git_commit(repo: Path) -> str | None:
    """HEAD's commit, read from .git without running git."""
    head = repo / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if not ref.startswith("ref: "):
            return ref
        path = repo / ".git" / ref[5:]
        if path.is_file():
            return path.read_text().strip()
        for line in (repo / ".git" / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref[5:]):
                return line.split()[0]
    except OSError:
        pass
    return None


def acceptance(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's bars: True / False, or None when the figure does not exist (or, for the time, the run is
    incomplete)."""
    checks = {}
    for key, op, bar in ACCEPTANCE:
        value = get(report, key)
        if key == "timing.total" and not report.get("complete"):
            value = None
        checks[f"{key} {op} {bar}"] = None if value is None else (value >= bar if op == ">=" else value <= bar)
    return checks


def largest_drop(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """The largest fall of a category's held-out accuracy from `before` to `after` (negative: all rose)."""
    drops = [before[c] - after[c] for c in CATEGORIES if before.get(c) is not None and after.get(c) is not None]
    return max(drops) if drops else None


def collect(cfg: DemoConfig, out: Path, stages: list[Stage], repo: Path) -> dict[str, Any]:
    """report.json's content (without the image list)."""
    done = {s.name: read_json(out / "stages" / f"{s.name}.done.json") for s in stages}
    missing = [n for n, r in done.items() if r is None]
    report: dict[str, Any] = {"name": cfg.name, "complete": not missing, "missing": missing}
    tok = tokenizer_section(out) if done.get("tokenizer") else None
    if tok is not None:
        model = read_yaml(out / "tokenizer" / "model" / "config.yaml") or {}
        shipped = read_json(out / "tokenizer" / "shipped.json")
        report["tokenizer"] = {**tok, "K": get(model, "schedule.K"), "codebook_size": get(model, "quantizer.codebook_size"),
                               "image_size": model.get("image_size"),
                               "source": f"shipped:{shipped['name']}" if shipped else "trained by the demo"}
    vlm = eval_section(read_json(out / "vlm_eval" / "summary.json")) if done.get("vlm_eval") else None
    if vlm is not None or done.get("vlm"):
        report["vlm"] = {**(vlm or {}), "training": training_summary(out / "vlm", ("loss", "loss_t2i", "loss_i2t"))}
    rl = eval_section(read_json(out / "rl_eval" / "summary.json")) if done.get("rl_eval") else None
    if rl is not None or done.get("rl"):
        report["rl"] = {**(rl or {}), "training": training_summary(out / "rl", ("reward_mean", "train_accuracy")),
                        "eval_during_training": read_jsonl(out / "rl" / "eval.jsonl")}
        if vlm is not None and rl is not None:
            change = rl_change(out)
            if change is not None:
                report["rl"]["change_vs_vlm"] = change
            report["rl"]["largest_category_drop"] = largest_drop(vlm["geneval_heldout"], rl["geneval_heldout"])
    timing = {n: r["seconds"] for n, r in done.items() if r is not None}
    report["timing"] = {**timing, "total": sum(timing.values())}
    report["config"] = {"demo": to_dict(cfg), "stages": {
        p.stem: yaml.safe_load(p.read_text()) for p in sorted((out / "configs").glob("*.yaml"))},
        "commands": {n: r["commands"] for n, r in done.items() if r is not None}}
    report["versions"] = versions(repo)
    report["acceptance"] = acceptance(report)
    return report


# ------------------------------------------------------------------------------------------------ grids
def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def wrap(draw: ImageDraw.ImageDraw, text: str, width: int, f: ImageFont.ImageFont) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=f) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def framed(image: Image.Image, scale: int, ok: bool | None, border: int = 3) -> Image.Image:
    """Upscaled (nearest) image in a green (correct) / red (wrong) / grey frame."""
    im = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    colour = (170, 170, 170) if ok is None else GOOD if ok else BAD
    canvas = Image.new("RGB", (im.width + 2 * border, im.height + 2 * border), colour)
    canvas.paste(im, (border, border))
    return canvas


def cell_sheet(cells: list[tuple[list[Image.Image], list[tuple[str, tuple[int, int, int]]]]], per_row: int,
               title: str, text_lines: int = 4, min_width: int = 150) -> Image.Image:
    """Cells of side-by-side images with coloured text lines under them, `per_row` cells per row."""
    f, ft, pad = font(11), font(14), 10
    iw = max(min_width, sum(im.width for im in cells[0][0]) + 4 * (len(cells[0][0]) - 1))
    ih = max(im.height for im in cells[0][0])
    ch = ih + text_lines * 13 + 6
    rows = -(-len(cells) // per_row)
    sheet = Image.new("RGB", (per_row * (iw + pad) + pad, 24 + rows * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 5), title, fill=INK, font=ft)
    for i, (images, texts) in enumerate(cells):
        r, c = divmod(i, per_row)
        x, y = pad + c * (iw + pad), 24 + pad + r * (ch + pad)
        for im in images:
            sheet.paste(im, (x, y))
            x += im.width + 4
        x, y = pad + c * (iw + pad), y + ih + 3
        lines = [(ln, colour) for text, colour in texts for ln in wrap(draw, text, iw, f)][:text_lines]
        for j, (ln, colour) in enumerate(lines):
            draw.text((x, y + 13 * j), ln, fill=colour, font=f)
    return sheet


def verdicts(report_path: Path) -> dict[str, bool]:
    data = read_json(report_path) or {}
    return {im["file_name"]: bool(im.get("correct")) for im in data.get("images", [])}


def spread(n: int, k: int) -> list[int]:
    return [(i * n) // k for i in range(min(k, n))]


def before_after_grid(out: Path, k: int, scale: int) -> Image.Image | None:
    """Held-out prompts (even spread over the categories): sample 0 before and after RL, same seed."""
    before, after = verdicts(out / "vlm_eval" / "t2i_report.json"), verdicts(out / "rl_eval" / "t2i_report.json")
    if not before or not after:
        return None
    entries = heldout_prompts()
    cells = []
    for i in spread(len(entries), k):
        name = f"{i:05d}_000.png"
        paths = [out / "vlm_eval" / "images" / name, out / "rl_eval" / "images" / name]
        if not all(p.is_file() for p in paths):
            continue
        oks = [before.get(name), after.get(name)]
        images = [framed(Image.open(p), scale, ok) for p, ok in zip(paths, oks)]
        marks = ["right" if ok else "wrong" for ok in oks]
        cells.append((images, [(entries[i]["tag"], (120, 120, 120)), (entries[i]["prompt"], INK),
                               (f"before: {marks[0]} | after: {marks[1]}", GOOD if oks[1] else BAD)]))
    return cell_sheet(cells, 4, "Held-out prompts, same seed: before RL | after RL (green frame: judged correct)",
                      text_lines=5) if cells else None


def captions_grid(out: Path, k: int, scale: int, size: int) -> Image.Image | None:
    """Held-out scenes with the VLM's caption (green: true of the scene) and the scene's source caption."""
    data = read_json(out / "vlm_eval" / "captions.json")
    if not data or not data.get("captions"):
        return None
    rows = data["captions"]
    cells = []
    for i in spread(len(rows), k):
        ex = make_example("heldout", i, seed=0, size=size)  # the scenes vlm.generate evaluate captions
        if ex.id != rows[i]["id"]:
            log.warning("caption row %d is for %s, expected %s; caption grid skipped", i, rows[i]["id"], ex.id)
            return None
        ok = bool(rows[i]["correct"])
        caption = rows[i]["caption"].strip() or "(empty)"
        cells.append(([framed(ex.image, scale, ok)], [(f"VLM: {caption}", GOOD if ok else BAD),
                                                      (f"scene: {rows[i]['truth']}", (90, 90, 90))]))
    return cell_sheet(cells, 6, "Held-out scenes captioned by the VLM (green: the caption is true of the scene)",
                      text_lines=5)


def world_grid(out: Path, k: int, scale: int) -> Image.Image | None:
    rows = read_jsonl(out / "shapes" / "train_preview" / "metadata.jsonl")[:k]
    if not rows:
        return None
    cells = [([framed(Image.open(out / "shapes" / "train_preview" / r["file_name"]), scale, None)],
              [(r["tag"], (120, 120, 120)), (r["caption"], INK)]) for r in rows]
    return cell_sheet(cells, 6, "Training scenes of the shapes world with their captions")


def rl_curve(out: Path, path: Path) -> bool:
    """`rl.train`'s held-out evaluations over its steps as a chart (overall with ± one standard error, and each
    category with its band) at `path`; False when the run has no evaluation yet."""
    evals = read_jsonl(out / "rl" / "eval.jsonl")
    if not evals:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in evals]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for cat in CATEGORIES:
        y = [e["per_category"].get(cat, float("nan")) for e in evals]
        se = [(e.get("per_category_standard_error") or {}).get(cat) or 0.0 for e in evals]
        line, = ax.plot(steps, y, lw=1.2, marker=".", label=cat)
        ax.fill_between(steps, [a - b for a, b in zip(y, se)], [a + b for a, b in zip(y, se)],
                        color=line.get_color(), alpha=0.12, lw=0)
    ax.errorbar(steps, [e["overall"] for e in evals], yerr=[e.get("overall_standard_error") or 0.0 for e in evals],
                color="black", lw=2.4, capsize=3, marker="o", label="overall")
    n = evals[-1].get("n")
    ax.set(xlabel="GRPO step", ylabel="held-out accuracy (program evaluator)", ylim=(-0.02, 1.02),
           title=f"Held-out accuracy during RL ({n} images per evaluation)\n"
                 "bands and bars: ± one standard error, prompts as the sampled units")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_grids(cfg: DemoConfig, out: Path, size: int | None) -> dict[str, str]:
    """All PNG figures in the output folder; returns {figure: file name} of those that could be made."""
    s = cfg.report
    made: dict[str, str] = {}
    figures = {"world": lambda: world_grid(out, 12, s.scale),
               "heldout_before_after": lambda: before_after_grid(out, s.grid_prompts, s.scale),
               "captions": lambda: captions_grid(out, s.caption_examples, s.scale, size) if size else None}
    for name, make in figures.items():
        image = make()
        if image is not None:
            image.save(out / f"{name}.png")
            made[name] = f"{name}.png"
    if rl_curve(out, out / "rl_curve.png"):
        made["rl_curve"] = "rl_curve.png"
    for stage, (step, path) in tokenizer_evals(out).items():
        png = path.with_suffix(".png")
        if png.is_file():
            name = "reconstructions_renderer" if stage == "stage2" else "reconstructions_decoder"
            what = "one-step renderer" if stage == "stage2" else "diffusion decoder"
            titled(Image.open(png), s.scale, f"Held-out scenes, original | reconstruction ({what}, "
                                              f"{stage} step {step})").save(out / f"{name}.png")
            made[name] = f"{name}.png"
    return made


def titled(image: Image.Image, scale: int, title: str) -> Image.Image:
    """`image` upscaled (nearest) under a title line."""
    im = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    f = font(14)
    probe = ImageDraw.Draw(im)
    sheet = Image.new("RGB", (max(im.width, int(probe.textlength(title, font=f)) + 20), im.height + 28), "white")
    sheet.paste(im, (0, 28))
    ImageDraw.Draw(sheet).text((10, 6), title, fill=INK, font=f)
    return sheet


# ------------------------------------------------------------------------------------------------ markdown
def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def minutes(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


#: Headline rows shown with a standard error (± one s.e., prompts as the sampled units).
STANDARD_ERRORS = {
    "held-out GenEval-style accuracy, before RL": "vlm.overall_standard_error",
    "held-out GenEval-style accuracy, after RL": "rl.overall_standard_error",
    "change after RL (paired, same prompts and seeds)": "rl.change_vs_vlm.standard_error",
}


def md_headline(r: dict[str, Any]) -> list[str]:
    lines = ["| measure | value | bar (full demo) |", "|---|---|---|"]
    rows = [("tokenizer PSNR (dB, held-out)", get(r, "tokenizer.psnr"), None, 2),
            ("tokenizer attribute preservation", get(r, "tokenizer.attribute_preservation"),
             "tokenizer.attribute_preservation >= 0.9", 3),
            ("tokenizer codebook usage", get(r, "tokenizer.codebook_usage"), None, 3),
            ("held-out GenEval-style accuracy, before RL", get(r, "vlm.geneval_heldout.overall"),
             "vlm.geneval_heldout.overall >= 0.4", 3),
            ("held-out caption accuracy", get(r, "vlm.caption_accuracy"), "vlm.caption_accuracy >= 0.8", 3),
            ("caption accuracy on new scenes of training compositions", get(r, "vlm.caption_accuracy_seen"),
             None, 3),
            ("held-out GenEval-style accuracy, after RL", get(r, "rl.geneval_heldout.overall"), None, 3),
            ("change after RL (paired, same prompts and seeds)", get(r, "rl.change_vs_vlm.change"),
             "rl.change_vs_vlm.change >= 0.1", 3),
            ("its standard error", get(r, "rl.change_vs_vlm.standard_error"),
             "rl.change_vs_vlm.standard_error <= 0.03", 3),
            ("largest drop of a category after RL", get(r, "rl.largest_category_drop"),
             "rl.largest_category_drop <= 0.05", 3),
            ("total time", None, "timing.total <= 2400", 0)]
    for label, value, bar, digits in rows:
        shown = minutes(get(r, "timing.total")) if label == "total time" else fmt(value, digits)
        se = get(r, STANDARD_ERRORS.get(label, ""))
        if se is not None:
            shown += f" ± {se:.{digits}f}"
        ok = r["acceptance"].get(bar) if bar else None
        limit = "" if bar is None else bar.split(" ", 1)[1]
        if label == "total time":
            limit = f"<= {minutes(float(limit.split()[-1]))}"
        verdict = "" if bar is None else f"{limit} {'✓' if ok else '✗' if ok is False else '—'}"
        lines.append(f"| {label} | {shown} | {verdict} |")
    return lines


def md_caption_kinds(r: dict[str, Any]) -> list[str]:
    """One line: held-out caption accuracy by the kind of held-out combination the scenes show."""
    kinds = get(r, "vlm.captions_per_heldout_kind")
    if not kinds:
        return []
    parts = ", ".join(f"{k} {fmt(v)}" for k, v in sorted(kinds.items()))
    return [f"Held-out captions by the kind of held-out combination in the scene: {parts} "
            "(\"none\": the single objects both splits share).", ""]


def md_categories(r: dict[str, Any]) -> list[str]:
    lines = ["| category | before RL | after RL | captions (before RL) | captions, training compositions |",
             "|---|---|---|---|---|"]
    for cat in (*CATEGORIES, "overall"):
        captions, seen = (get(r, f"vlm.caption_accuracy{s}" if cat == "overall"
                              else f"vlm.captions{s}_per_category.{cat}") for s in ("", "_seen"))
        lines.append(f"| {cat} | {fmt(get(r, f'vlm.geneval_heldout.{cat}'))} | "
                     f"{fmt(get(r, f'rl.geneval_heldout.{cat}'))} | {fmt(captions)} | {fmt(seen)} |")
    return lines


def md_tokenizer(r: dict[str, Any]) -> list[str]:
    lines = ["| decoder | step | PSNR (dB) | SSIM | attribute preservation | codebook usage | perplexity |",
             "|---|---|---|---|---|---|---|"]
    for part in ("decoder", "renderer"):
        m = get(r, f"tokenizer.{part}")
        if m:
            name = f"diffusion ({m.get('decoder_steps', '?')} steps)" if part == "decoder" else "renderer (1 step)"
            lines.append(f"| {name} | {m.get('step')} | {fmt(m.get('psnr'), 2)} | {fmt(m.get('ssim'))} | "
                         f"{fmt(m.get('attribute_preservation'))} | {fmt(m.get('codes_used_fraction'))} | "
                         f"{fmt(m.get('perplexity'), 1)} |")
    return lines


def tokenizer_source(r: dict[str, Any]) -> str:
    source = get(r, "tokenizer.source") or ""
    if source.startswith("shipped:"):
        name = source.split(":", 1)[1]
        return (f"The tokenizer shipped in `selftok/pretrained/{name}/` (its full training recipe, run once; "
                "`--retrain-tokenizer` trains one with the quick recipe instead); its figures are those of its "
                "own training run.")
    return "The tokenizer trained by this demo (`tokenizer.config`)." if source else ""


def md_rl_curve(r: dict[str, Any]) -> list[str]:
    """`rl.train`'s own held-out evaluations over its steps (its eval settings, see configs/rl.yaml)."""
    evals = get(r, "rl.eval_during_training") or []
    if not evals:
        return []
    lines = ["`rl.train`'s own held-out evaluations while training (its eval settings):", "",
             "| step | overall | " + " | ".join(CATEGORIES) + " |", "|---" * (len(CATEGORIES) + 2) + "|"]
    for e in evals:
        cats = " | ".join(fmt(e.get("per_category", {}).get(c)) for c in CATEGORIES)
        lines.append(f"| {e.get('step')} | {fmt(e.get('overall'))} | {cats} |")
    return [*lines, ""]


def md_timing(r: dict[str, Any], stages: list[Stage]) -> list[str]:
    lines = ["| stage | what | time |", "|---|---|---|"]
    for s in stages:
        lines.append(f"| {s.name} | {s.title} | {minutes(get(r, f'timing.{s.name}'))} |")
    lines.append(f"| report | report.md, report.json, grids | {minutes(get(r, 'timing.report'))} |")
    lines.append(f"| **total** | | **{minutes(get(r, 'timing.total'))}** |")
    return lines


def image_md(images: dict[str, str], name: str, alt: str) -> list[str]:
    return [f"![{alt}]({images[name]})", ""] if name in images else [f"*({alt}: not available yet)*", ""]


def write_markdown(r: dict[str, Any], stages: list[Stage], out: Path) -> None:
    images, v = r["images"], r["versions"]
    done = "all stages finished" if r["complete"] else f"**incomplete** — not run yet: {', '.join(r['missing'])}"
    K, C = get(r, "tokenizer.K"), get(r, "tokenizer.codebook_size")
    vt, rt = get(r, "vlm.training") or {}, get(r, "rl.training") or {}
    lines = [
        f"# Selftok on the shapes world — {r['name']} report", "",
        ("The whole method on a laptop-sized problem: an image tokenizer, a language model trained on its "
         "tokens for text→image and image→text, and GRPO with a program evaluator as the reward. "
         f"This run ({done}) took {minutes(get(r, 'timing.total'))} on {v['cpu_count']} CPUs "
         f"(torch {v['torch']}, commit {str(v['git_commit'])[:10]}). Every number is in `report.json`; a "
         "dotted name such as `vlm.geneval_heldout.overall` addresses its nested objects."), "",
        *md_headline(r), "",
        ("± one standard error, with the held-out prompts as the sampled units (the seeds of one prompt are "
         "not independent draws); the paired change compares each image before and after RL."), "",
        *([("*Smoke run: every stage at minimal size; the bars are for the full demo and are not expected "
            "here.*"), ""] if "smoke" in r["name"] else []),
        "## 1. The world",
        ("Flat shapes on grey, captions in GenEval's six categories. Held-out prompts combine attributes that "
        "never appear together in a training caption (e.g. a red square, three circles, a circle above a "
        "square), so the held-out scores measure compositional generalisation."), "",
        *image_md(images, "world", "training scenes"),
        f"## 2. The tokenizer: {K or '—'} tokens per image, codebook of {C or '—'}",
        (f"{tokenizer_source(r)} With a learned latent, stage 0 trains its small autoencoder (as SD3's VAE is for "
        "the official tokenizer); stage 1 the encoder, the codebook and a diffusion decoder; stage 2 a "
        "one-step renderer. Held-out scenes, original | reconstruction pairs. *Attribute preservation* = share of "
        "reconstructions whose every object keeps its shape, colour, count and relative position."), "",
        *md_tokenizer(r), "",
        *image_md(images, "reconstructions_renderer", "renderer reconstructions"),
        *image_md(images, "reconstructions_decoder", "diffusion-decoder reconstructions"),
        "## 3. The VLM: text→image and image→text on the same tokens",
        (f"{vt.get('steps', '—')} steps; last loss {fmt(vt.get('loss'))} (t2i {fmt(vt.get('loss_t2i'))}, "
        f"i2t {fmt(vt.get('loss_i2t'))}). Held-out accuracy per category (96 prompts, program evaluator, "
        "GenEval rules):"), "",
        *md_categories(r), "",
        *md_caption_kinds(r),
        *image_md(images, "captions", "captions of held-out scenes"),
        "## 4. RL: GRPO with the evaluator as reward",
        (f"{rt.get('steps', '—')} steps on training prompts only (last mean reward "
        f"{fmt(rt.get('reward_mean'))}); the held-out prompts and seeds are the same before and after."), "",
        *image_md(images, "rl_curve", "held-out accuracy over the RL steps"),
        *md_rl_curve(r),
        *image_md(images, "heldout_before_after", "held-out samples before and after RL"),
        "## Time per stage", "", *md_timing(r, stages), "",
        "## Files", "",
        ("`report.json` (all numbers), `configs/` (every stage's config as run), `stages/` (completion records: "
        "commands, outputs with sha256), `logs/` (each stage's output), `vlm_eval/` and `rl_eval/` (images, "
        "per-image verdicts, captions), `tokenizer/`, `tokens/`, `vlm/`, `rl/` (runs and checkpoints)."), "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def write_report(cfg: DemoConfig, out: Path, stages: list[Stage]) -> dict[str, Any]:
    """Write report.json, report.md and the grids into `out`; returns the report."""
    start = time.monotonic()
    repo = Path(__file__).resolve().parents[2]
    report = collect(cfg, out, stages, repo)
    report["images"] = write_grids(cfg, out, get(report, "tokenizer.image_size"))
    report["timing"]["report"] = time.monotonic() - start
    report["timing"]["total"] += report["timing"]["report"]
    report["acceptance"] = acceptance(report)
    write_markdown(report, stages, out)
    write_atomic(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    return report


def read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


