"""`python -m selftok.shapes`: export -> evaluate round trip, held-out prompts, folders with bad files."""
from __future__ import annotations

import json
import shutil

import datasets
from PIL import Image

from selftok.shapes import heldout_prompts, load_prompts, parse_prompt, split_of
from selftok.shapes.cli import main


def test_export_then_evaluate_round_trip(tmp_path):
    out = tmp_path / "train"
    assert main(["export", "--split", "train", "--n", "24", "--out", str(out), "--seed", "3"]) == 0
    rows = [json.loads(ln) for ln in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all((out / r["file_name"]).is_file() for r in rows)
    assert all(split_of(parse_prompt(r["caption"])) == "train" for r in rows)   # no held-out caption
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == 24 and {"image", "caption", "spec", "tag"} <= set(ds.column_names)
    report_path = tmp_path / "report.json"
    assert main(["evaluate", "--images", str(out), "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["overall"] == 1.0 and report["n_images"] == 24 and report["n_errors"] == 0
    assert len(report["per_category"]) == 6 and report["images"][0]["claims"]
    # attribute preservation against the full-scene spec
    argv = ["evaluate", "--images", str(out), "--spec-key", "scene_spec", "--out", str(report_path)]
    assert main(argv) == 0
    assert json.loads(report_path.read_text())["overall"] == 1.0


def test_evaluate_reports_bad_files_without_stopping(tmp_path):
    out = tmp_path / "mixed"
    main(["export", "--split", "heldout", "--n", "6", "--out", str(out), "--size", "40"])
    rows = [json.loads(ln) for ln in (out / "metadata.jsonl").read_text().splitlines()]
    Image.open(out / rows[0]["file_name"]).convert("L").save(out / rows[0]["file_name"])   # grayscale
    Image.open(out / rows[1]["file_name"]).resize((200, 200)).save(out / rows[1]["file_name"])  # wrong size
    (out / rows[2]["file_name"]).write_text("garbage")                                    # not an image
    (out / rows[3]["file_name"]).unlink()                                                 # missing
    rows[4]["spec"] = json.dumps({"tag": "colors", "include": [{"class": "dog", "count": 1}]})
    rows.append({"file_name": "extra.png", "prompt": "a photo of a unicorn"})
    shutil.copy(out / rows[5]["file_name"], out / "extra.png")
    Image.new("RGB", (64, 64)).save(out / "unlisted.png")
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    main(["evaluate", "--images", str(out), "--out", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    errors = {e["file_name"]: e["error"] for e in report["errors"]}
    assert "not a readable image" in errors[rows[2]["file_name"]]
    assert "not a readable image" in errors[rows[3]["file_name"]]
    assert "'dog'" in errors[rows[4]["file_name"]]
    assert "cannot parse prompt 'a photo of a unicorn'" in errors["extra.png"]
    assert any("not JSON" in e for e in errors.values())
    assert rows[1]["file_name"] not in errors and rows[0]["file_name"] not in errors
    assert report["unlisted"] == ["unlisted.png"] and report["n_errors"] == 5
    assert report["images"][1]["correct"]


def test_geneval_output_layout(tmp_path):
    entries = heldout_prompts()[:2]
    for i, e in enumerate(entries):
        d = tmp_path / f"{i:05d}"
        (d / "samples").mkdir(parents=True)
        spec = {k: v for k, v in e.items() if k not in ("id", "seed")}
        (d / "metadata.jsonl").write_text(json.dumps(spec) + "\n")
        from selftok.shapes import render_spec
        for s in range(2):
            render_spec(spec, seed=s)[1].save(d / "samples" / f"{s:04d}.png")
    main(["evaluate", "--images", str(tmp_path), "--out", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_images"] == 4 and report["overall"] == 1.0


def test_prompts_verb(tmp_path, capsys):
    main(["prompts", "--split", "heldout", "--out", str(tmp_path / "h.jsonl")])
    specs = load_prompts(tmp_path / "h.jsonl", shapes_only=True)
    assert [s["prompt"] for s in specs] == [e["prompt"] for e in heldout_prompts()]
    assert specs[0]["seed"] == 1000
    main(["prompts", "--split", "heldout", "--format", "txt"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 96 and lines[0] == "a photo of a circle"
