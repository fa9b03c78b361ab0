"""Token shards: write → read identity, AR order, plain-`datasets` readability, manifest checks, atomicity."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from selftok.data.shards import (
    ShardError,
    ShardManifest,
    ar_to_encoder_order,
    codes_to_uint16,
    encoder_to_ar_order,
    iter_token_batches,
    open_token_shards,
    read_records,
    read_tokens,
    remove_stale_files,
    token_table,
    write_shard,
)

K, C = 12, 40000  # a codebook above 2**15 exercises the high bit of uint16


def _job(tmp_path, n_shards=3, per_shard=5, seed=0):
    """Write `n_shards` shards of random encoder-order codes; return (dir, manifest, rows in encoder order)."""
    rng = np.random.default_rng(seed)
    manifest = ShardManifest(K=K, codebook_size=C, tokenizer={"checkpoint_sha256": "abc", "config": {}},
                             image_size=32, plan={"num_inputs": n_shards * per_shard, "shard_size": per_shard})
    rows = []
    for s in range(n_shards):
        codes = torch.from_numpy(rng.integers(0, C, size=(per_shard, K)))  # int64, encoder order
        ids = [f"img-{s}-{i}" for i in range(per_shard)]
        caps = [[f"caption {s} {i}", "second"] if i % 2 else [] for i in range(per_shard)]
        meta = [json.dumps({"i": i}) if i % 3 else None for i in range(per_shard)]
        table = token_table(ids, codes_to_uint16(encoder_to_ar_order(codes), C), caps, meta)
        rec = write_shard(tmp_path, rank=s % 2, shard=s, table=table, rejects=[{"source_id": f"bad-{s}",
                          "reason": "corrupt"}], fingerprint=manifest.fingerprint())
        manifest.shards.append(rec.file)
        rows += list(zip(ids, codes.numpy(), caps))
    manifest.counts = {"written": len(rows), "rejected": n_shards}
    manifest.save(tmp_path)
    return tmp_path, manifest, rows


def test_write_read_identity_in_ar_order(tmp_path):
    directory, _, rows = _job(tmp_path)
    manifest, ds = open_token_shards(directory, expect_K=K, expect_codebook_size=C, in_memory=True)
    assert manifest.order == "ar" and len(ds) == len(rows)
    assert ds["id"] == [r[0] for r in rows]
    assert ds["captions"] == [r[2] for r in rows]
    stored = read_tokens(ds, np.arange(len(ds)))
    assert stored.dtype == np.uint16
    codes = np.stack([r[1] for r in rows])
    # stored order is the encoder order reversed: tokens[:, 0] is encoder index K-1 (the coarsest token)
    np.testing.assert_array_equal(stored[:, 0], codes[:, K - 1])
    np.testing.assert_array_equal(stored, codes[:, ::-1])
    np.testing.assert_array_equal(ar_to_encoder_order(stored.astype(np.int64)), codes)
    assert not np.array_equal(stored, codes)  # random codes are not palindromes: the flip is observable


def test_batches_are_int64_and_match_rows(tmp_path):
    directory, _, rows = _job(tmp_path)
    _, ds = open_token_shards(directory)  # through the datasets cache (memory-mapped)
    seen = []
    for batch in iter_token_batches(ds, batch_size=4):
        assert batch.tokens.dtype == torch.int64 and batch.tokens.shape[1] == K and len(batch.ids) <= 4
        seen += list(zip(batch.ids, batch.tokens.flip(-1).numpy(), batch.captions))
    assert [s[0] for s in seen] == [r[0] for r in rows]
    for (_, got, cap), (_, want, want_cap) in zip(seen, rows):
        np.testing.assert_array_equal(got, want)
        assert cap == want_cap
    picked = read_tokens(ds.select([7, 2]), [1, 0])  # works on index-mapped views too
    np.testing.assert_array_equal(picked, np.stack([rows[2][1], rows[7][1]])[:, ::-1])


def test_plain_datasets_reads_shards(tmp_path):
    import datasets
    directory, _, rows = _job(tmp_path)
    ds = datasets.load_dataset("parquet", data_files=str(directory / "*.parquet"), split="train")
    assert ds.features["tokens"] == datasets.List(datasets.Value("uint16"), length=K)
    assert sorted(ds["id"]) == sorted(r[0] for r in rows)
    by_id = {r[0]: r for r in rows}
    for row in ds:
        assert row["tokens"] == by_id[row["id"]][1][::-1].tolist()
        assert row["captions"] == by_id[row["id"]][2]


@pytest.mark.parametrize("kwargs, words", [
    ({"expect_K": K + 1}, "K = 12 tokens per image, expected 13"),
    ({"expect_codebook_size": 1024}, "codebook_size = 40000, expected 1024"),
    ({"expect_order": "encoder"}, "order is 'ar'"),
])
def test_reader_refuses_mismatch(tmp_path, kwargs, words):
    directory, _, _ = _job(tmp_path, n_shards=1)
    with pytest.raises(ShardError, match=words):
        open_token_shards(directory, in_memory=True, **kwargs)


def test_reader_refuses_incomplete_missing_and_bad_codes(tmp_path):
    directory, manifest, _ = _job(tmp_path, n_shards=2)
    manifest.complete = False
    manifest.save(directory)
    with pytest.raises(ShardError, match="not complete"):
        open_token_shards(directory, in_memory=True)
    assert len(open_token_shards(directory, in_memory=True, allow_incomplete=True)[1]) == 10
    manifest.complete = True
    manifest.codebook_size = 100  # stored codes go up to ~40000
    manifest.save(directory)
    with pytest.raises(ShardError, match="outside the manifest's codebook of 100"):
        open_token_shards(directory, in_memory=True)
    manifest.codebook_size = C
    manifest.counts["written"] = 11
    manifest.save(directory)
    with pytest.raises(ShardError, match="counts 11 rows but the shards hold 10"):
        open_token_shards(directory, in_memory=True)
    (directory / manifest.shards[1]).unlink()
    with pytest.raises(ShardError, match="missing"):
        open_token_shards(directory, in_memory=True)


def test_variable_length_token_lists_are_checked(tmp_path):
    rows = [np.arange(K, dtype=np.uint16), np.arange(K - 1, dtype=np.uint16)]
    table = pa.table({"id": ["a", "b"], "tokens": pa.array(rows, pa.list_(pa.uint16())),
                      "captions": pa.array([[], []], pa.list_(pa.string()))})
    pq.write_table(table, tmp_path / "shard-00000-00000.parquet")
    ShardManifest(K=K, codebook_size=C, shards=["shard-00000-00000.parquet"],
                  counts={"written": 2, "rejected": 0}).save(tmp_path)
    with pytest.raises(ShardError, match="not all of length K = 12"):
        open_token_shards(tmp_path, in_memory=True)
    pq.write_table(table.slice(0, 1), tmp_path / "shard-00000-00000.parquet")
    ShardManifest(K=K, codebook_size=C, shards=["shard-00000-00000.parquet"],
                  counts={"written": 1, "rejected": 0}).save(tmp_path)
    assert read_tokens(open_token_shards(tmp_path, in_memory=True)[1], [0]).tolist() == [list(range(K))]


def test_codes_to_uint16_checks_range():
    with pytest.raises(ShardError, match="outside"):
        codes_to_uint16(np.array([[0, 64]]), 64)
    with pytest.raises(ShardError, match="outside"):
        codes_to_uint16(np.array([[-1, 3]]), 64)
    with pytest.raises(ShardError, match="does not fit uint16"):
        codes_to_uint16(np.array([[0]]), 70000)
    assert codes_to_uint16(torch.tensor([[65535, 0]]), 65536).tolist() == [[65535, 0]]


def test_records_fingerprints_and_leftovers(tmp_path):
    directory, manifest, _ = _job(tmp_path, n_shards=2)
    records = read_records(directory, manifest.fingerprint())
    assert sorted(records) == [0, 1] and records[1].rejects == [{"source_id": "bad-1", "reason": "corrupt"}]
    with pytest.raises(ShardError, match="different pre-tokenization job"):
        read_records(directory, "another-job")
    other = ShardManifest(K=K, codebook_size=C, tokenizer={"checkpoint_sha256": "xyz", "config": {}})
    assert other.fingerprint() != manifest.fingerprint()
    # a shard killed mid-write leaves a temporary file that is never picked up as data, and is cleaned before redo
    (directory / "shard-00001-00002.parquet.tmp123").write_bytes(b"partial")
    (directory / "shard-00000-00002.parquet").write_bytes(b"renamed but no record")
    assert 2 not in read_records(directory)
    remove_stale_files(directory, [2])
    assert sorted(p.name for p in directory.glob("shard-*")) == sorted(manifest.shards)


def test_all_rejected_shard_has_record_but_no_file(tmp_path):
    empty = token_table([], np.zeros((0, K), np.uint16), [])
    rec = write_shard(tmp_path, 0, 4, empty, [{"source_id": "x", "reason": "corrupt"}], "fp")
    assert rec.file is None and not list(tmp_path.glob("*.parquet"))
    assert read_records(tmp_path, "fp")[4].rejects[0]["source_id"] == "x"
    manifest = ShardManifest(K=K, codebook_size=C, counts={"written": 0, "rejected": 1})
    manifest.save(tmp_path)
    _, ds = open_token_shards(tmp_path)
    assert len(ds) == 0 and "tokens" in ds.column_names
