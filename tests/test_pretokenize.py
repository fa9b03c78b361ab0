"""Pre-tokenization end to end with a tiny real tokenizer: codes, bad inputs, resume after SIGKILL, 2 ranks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from data_testutil import bad_corpus, encode, noise_image, write_imagefolder

from selftok.data.shards import ShardError, open_token_shards
from selftok.data.sources import ImageSource
from selftok.model.presets import load_tokenizer_config
from selftok.model.tokenizer import SelftokTokenizer
from selftok.pretokenize import PretokenizeConfig, inspect, main, pretokenize
from selftok.runtime.config import from_dict, load_config

S = 16
REPO = Path(__file__).resolve().parents[1]


def _tokenizer(seed: int = 0) -> SelftokTokenizer:
    torch.manual_seed(seed)
    tok = SelftokTokenizer(load_tokenizer_config("tiny", overrides=[f"image_size={S}"])).eval()
    with torch.no_grad():  # untrained queries start almost equal (0.02·N(0, 1)); spread them so that the
        tok.encoder.query_tokens.normal_()  # codes differ between positions and the AR flip is visible
    return tok


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    _tokenizer().save_pretrained(path)
    return path


def _cfg(out: Path, data: dict, **sections) -> PretokenizeConfig:
    tree = {"data": {**data, "transform": {"image_size": S, **data.get("transform", {})}},
            "output": {"dir": str(out), "shard_size": 4, **sections.get("output", {})},
            "run": {"batch_size": 3, "num_workers": 0, "progress": False, **sections.get("run", {})},
            "tokenizer": sections.get("tokenizer", {})}
    return from_dict(PretokenizeConfig, tree)


def _shapes(n: int = 10) -> dict:
    return {"kind": "shapes", "shapes": {"n": n, "size": 32}}


def _rows(directory: Path) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
    _, ds = open_token_shards(directory, in_memory=True)
    return [(r["id"], tuple(r["tokens"]), tuple(r["captions"])) for r in ds]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; on timeout kill the whole group (torchrun's workers too)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s: {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ------------------------------------------------------------------------------------------------ codes
def test_shards_hold_the_encoder_codes_reversed(tmp_path):
    tok = _tokenizer()
    cfg = _cfg(tmp_path / "out", _shapes(10))
    manifest = pretokenize(cfg, tok)
    assert manifest.complete and manifest.counts == {"written": 10, "rejected": 0}
    assert manifest.K == tok.K and manifest.codebook_size == tok.codebook_size and manifest.order == "ar"
    assert manifest.shards == [f"shard-00000-{s:05d}.parquet" for s in range(3)]  # 4 + 4 + 2 inputs
    _, ds = open_token_shards(tmp_path / "out", expect_K=tok.K, expect_codebook_size=tok.codebook_size)
    source = ImageSource(cfg.data)
    device = next(tok.parameters()).device  # pretokenize moved it to the process's device
    images = torch.stack([source[i].pixels for i in range(10)]).float() / 255
    codes = tok.encode(images.to(device)).cpu()  # (10, K) encoder order
    stored = torch.tensor(ds["tokens"])
    assert torch.equal(stored, codes.flip(-1))
    assert not torch.equal(stored, codes)  # the reversal is visible with these codes
    assert ds["id"] == [source[i].id for i in range(10)]
    assert ds["captions"] == [source[i].captions for i in range(10)]
    assert json.loads(ds["meta"][0])["spec"]["prompt"]


def test_bad_input_corpus_is_accounted_for(tmp_path):
    corpus = bad_corpus()
    folder = write_imagefolder(tmp_path / "images", corpus)
    data = {"kind": "imagefolder", "path": str(folder), "missing_caption": "skip", "cache_dir": str(tmp_path / "c"),
            "transform": {"small_images": "reject"}}
    manifest = pretokenize(_cfg(tmp_path / "out", data), _tokenizer())
    expected = {name: kind for name, _, _, kind in corpus}
    assert manifest.counts["written"] + manifest.counts["rejected"] == len(corpus)
    assert {r["source_id"]: r["reason"].split(":")[0] for r in manifest.rejects} == {
        n: k for n, k in expected.items() if k is not None}
    written = _rows(tmp_path / "out")
    assert {r[0] for r in written} == {n for n, k in expected.items() if k is None}
    assert len(written) == manifest.counts["written"]
    # keep policy: caption-less images are written with an empty caption list, the rest is unchanged
    data["missing_caption"] = "keep"
    kept = pretokenize(_cfg(tmp_path / "out_keep", data), _tokenizer())
    assert kept.counts["written"] == manifest.counts["written"] + 2
    assert {r[0]: r[2] for r in _rows(tmp_path / "out_keep")}["nocaption.png"] == ()


def test_refuses_to_mix_with_another_tokenizer_or_stray_shards(tmp_path):
    out = tmp_path / "out"
    pretokenize(_cfg(out, _shapes(5)), _tokenizer(seed=0))
    with pytest.raises(ShardError, match="different job.*checkpoint_sha256"):
        pretokenize(_cfg(out, _shapes(5)), _tokenizer(seed=1))
    with pytest.raises(ShardError, match="different job.*shard_size"):
        pretokenize(_cfg(out, _shapes(5), output={"shard_size": 2}), _tokenizer(seed=0))
    again = pretokenize(_cfg(out, _shapes(5)), _tokenizer(seed=0))  # same job: nothing to do, same result
    assert again.complete and again.counts["written"] == 5
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "shard-00000-00000.parquet").write_bytes(b"x")
    with pytest.raises(ShardError, match="no manifest; refusing to mix"):
        pretokenize(_cfg(stray, _shapes(5)), _tokenizer())


def test_duplicate_ids_are_kept_and_reported(tmp_path):
    table = pa.table({"image": pa.array([encode(noise_image(20, 20, i)) for i in range(6)], pa.binary()),
                      "key": ["a", "b", "a", "c", "b", "a"], "caption": [f"c{i}" for i in range(6)]})
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "data.parquet")
    data = {"kind": "parquet", "path": str(tmp_path / "pq"), "id_column": "key", "cache_dir": str(tmp_path / "c")}
    manifest = pretokenize(_cfg(tmp_path / "out", data), _tokenizer())
    assert manifest.counts["written"] == 6
    assert manifest.duplicate_ids["count"] == 2 and sorted(manifest.duplicate_ids["examples"]) == ["a", "b"]


def test_bf16_option_runs_and_is_part_of_the_job(tmp_path):
    manifest = pretokenize(_cfg(tmp_path / "out", _shapes(4), run={"mixed_precision": "bf16"}), _tokenizer())
    assert manifest.complete and manifest.transform["precision"] == "bf16"
    with pytest.raises(ShardError, match="precision"):
        pretokenize(_cfg(tmp_path / "out", _shapes(4)), _tokenizer())


def test_cli_with_shipped_config_and_inspect(tmp_path, tok_dir, capsys):
    shipped = load_config(PretokenizeConfig, REPO / "configs" / "pretokenize_shapes.yaml")
    assert shipped.data.kind == "shapes" and load_config(PretokenizeConfig,
                                                         REPO / "configs" / "pretokenize_official.yaml")
    out = tmp_path / "out"
    rc = main(["--config", str(REPO / "configs" / "pretokenize_shapes.yaml"), f"tokenizer.path={tok_dir}",
               f"output.dir={out}", "data.shapes.n=5", "data.shapes.size=32", f"data.transform.image_size={S}",
               "run.num_workers=1", "run.batch_size=2", "run.progress=false"])
    assert rc == 0 and len(_rows(out)) == 5
    summary = inspect(str(out), SelftokTokenizer.from_pretrained(tok_dir), n=4, out=str(tmp_path / "grid.png"))
    assert summary["rows"] == 5 and summary["K"] == 16
    from PIL import Image
    assert Image.open(tmp_path / "grid.png").size == (2 * S, 2 * S)  # 4 rows decoded, 2 x 2 grid
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"written": 5, "rejected": 0}


# ------------------------------------------------------------------------------------------------ resume, ranks
def _write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_resume_after_sigkill_gives_the_uninterrupted_result(tmp_path, tok_dir):
    """A path-column parquet source whose input 13 is a FIFO: the run blocks there (after shards 0-2 are
    written), is SIGKILLed, the FIFO is replaced by the real image, and the re-run completes the job."""
    images = tmp_path / "images"
    images.mkdir()
    n, blocked = 22, 13
    for i in range(n):
        (images / f"{i:03d}.png").write_bytes(encode(noise_image(20, 20, i)))
    real = (images / f"{blocked:03d}.png").read_bytes()
    table = pa.table({"image": [str(images / f"{i:03d}.png") for i in range(n)], "caption": [f"c{i}" for i in range(n)]})
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "paths.parquet")
    data = {"kind": "parquet", "path": str(tmp_path / "pq"), "cache_dir": str(tmp_path / "c"),
            "transform": {"image_size": S}}
    tree = {"data": data, "tokenizer": {"path": str(tok_dir)}, "output": {"dir": str(tmp_path / "killed"),
            "shard_size": 4}, "run": {"batch_size": 2, "num_workers": 0, "progress": False}}
    config = _write_yaml(tmp_path / "job.yaml", tree)
    reference = pretokenize(_cfg(tmp_path / "reference", data, tokenizer={"path": str(tok_dir)},
                                 run={"batch_size": 2}), None)

    (images / f"{blocked:03d}.png").unlink()
    os.mkfifo(images / f"{blocked:03d}.png")
    cmd = [sys.executable, "-m", "selftok.pretokenize", "--config", str(config)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    progress = tmp_path / "killed" / "progress"
    deadline = time.monotonic() + 120
    try:
        while not all((progress / f"{s:05d}.json").exists() for s in range(3)):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the run did not reach the blocking input"
            time.sleep(0.2)
        time.sleep(0.5)  # it now sits in open() of the FIFO, inside shard 3
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    done_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "killed").glob("*.parquet")}
    assert sorted(done_before) == [f"shard-00000-{s:05d}.parquet" for s in range(3)]
    assert not json.loads((tmp_path / "killed" / "manifest.json").read_text())["complete"]
    with pytest.raises(ShardError, match="not complete"):
        open_token_shards(tmp_path / "killed")

    (images / f"{blocked:03d}.png").unlink()
    (images / f"{blocked:03d}.png").write_bytes(real)
    rerun = _run(cmd, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name, mtime in done_before.items():  # finished shards were skipped, not rewritten
        assert (tmp_path / "killed" / name).stat().st_mtime_ns == mtime
    resumed, want = _rows(tmp_path / "killed"), _rows(tmp_path / "reference")
    assert resumed == want and len({r[0] for r in resumed}) == n == reference.counts["written"]


def test_two_ranks_cover_every_input_once(tmp_path, tok_dir):
    data = {"kind": "shapes", "shapes": {"n": 14, "size": 32}, "transform": {"image_size": S}}
    tree = {"data": data, "tokenizer": {"path": str(tok_dir)}, "output": {"dir": str(tmp_path / "two"),
            "shard_size": 3}, "run": {"batch_size": 2, "num_workers": 0, "progress": False}}
    config = _write_yaml(tmp_path / "job.yaml", tree)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "selftok.pretokenize", "--config", str(config)]
    result = _run(cmd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    # 5 shards: rank 0 writes 0, 2, 4 and rank 1 writes 1, 3 (shard s -> rank s mod 2)
    assert manifest["shards"] == ["shard-00000-00000.parquet", "shard-00001-00001.parquet",
                                  "shard-00000-00002.parquet", "shard-00001-00003.parquet",
                                  "shard-00000-00004.parquet"]
    single = pretokenize(_cfg(tmp_path / "one", data, tokenizer={"path": str(tok_dir)},
                              output={"shard_size": 3}, run={"batch_size": 2}), None)
    two, one = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert two == one and len({r[0] for r in two}) == 14 == single.counts["written"]
    # resume with another world size: drop shard 3 (written by rank 1) and finish it with one process
    (tmp_path / "two" / "shard-00001-00003.parquet").unlink()
    (tmp_path / "two" / "progress" / "00003.json").unlink()
    pretokenize(_cfg(tmp_path / "two", data, tokenizer={"path": str(tok_dir)}, output={"shard_size": 3},
                     run={"batch_size": 2}), None)
    assert _rows(tmp_path / "two") == one
    assert (tmp_path / "two" / "shard-00000-00003.parquet").is_file()
