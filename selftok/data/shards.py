"""Token shards: K Selftok codes per image stored as ``uint16`` in AR order, in Parquet files plus a manifest.

Layout of a shard directory (docs/contracts.md)::

    DIR/manifest.json                   ShardManifest: tokenizer, K, codebook size, order, counts, rejects, shards
    DIR/shard-RRRRR-SSSSS.parquet       rows of shard SSSSS (global index), written by rank RRRRR
    DIR/progress/SSSSS.json             ShardRecord: the shard's written count and rejects (resume bookkeeping)

Parquet columns: ``id`` (string), ``tokens`` (fixed-size list of K ``uint16``, AR order), ``captions`` (list of
string, possibly empty), ``meta`` (JSON string or null). AR order is the encoder's index order reversed:
``tokens[0]`` is encoder index K−1, the coarsest token (`encoder_to_ar_order`). Every file is written under a
temporary name and renamed when complete, and a shard counts as done only once its progress record exists,
so a killed run leaves nothing half-written behind. The shards read with plain
``datasets.load_dataset("parquet", data_files="DIR/*.parquet")``; `open_token_shards` adds the manifest checks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from selftok.runtime.io import write_atomic

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ORDER_AR = "ar"
MANIFEST_NAME = "manifest.json"
PROGRESS_DIR = "progress"
MAX_UINT16_CODEBOOK = 1 << 16


class ShardError(ValueError):
    """Token shards that are missing, malformed, or do not match what the caller expects."""


# ------------------------------------------------------------------------------------------------ token order
def encoder_to_ar_order(codes: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """(..., K) codes in encoder index order → AR order (a flip of the last axis; index 0 = coarsest)."""
    return codes.flip(-1) if isinstance(codes, Tensor) else np.ascontiguousarray(np.flip(codes, -1))


def ar_to_encoder_order(tokens: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """(..., K) tokens in AR order → encoder index order (the inverse flip), e.g. before decoding."""
    return encoder_to_ar_order(tokens)


def codes_to_uint16(codes: Tensor | np.ndarray, codebook_size: int) -> np.ndarray:
    """(B, K) integer codes → (B, K) ``uint16`` array; raises ShardError on a code outside [0, codebook_size)."""
    if codebook_size > MAX_UINT16_CODEBOOK:
        raise ShardError(f"codebook size {codebook_size} does not fit uint16 (at most {MAX_UINT16_CODEBOOK})")
    array = codes.detach().cpu().numpy() if isinstance(codes, Tensor) else np.asarray(codes)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ShardError(f"codes must be a (B, K) integer array, got shape {array.shape} dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= codebook_size):
        raise ShardError(f"codes lie in [{array.min()}, {array.max()}], outside [0, {codebook_size})")
    return array.astype(np.uint16)


# ------------------------------------------------------------------------------------------------ manifest
#: Manifest fields that identify a pre-tokenization job: a resume (or another rank) must agree on all of them.
IDENTITY_FIELDS = ("schema_version", "tokenizer", "K", "codebook_size", "order", "image_size", "transform",
                   "source", "plan")


@dataclasses.dataclass
class ShardManifest:
    """The contents of ``manifest.json`` (docs/contracts.md); unknown keys of a newer writer are kept in `extra`."""

    K: int
    """Tokens per image."""
    codebook_size: int
    """Codes lie in [0, codebook_size)."""
    order: str = ORDER_AR
    """``"ar"``: tokens stored in AR order = the encoder's index order reversed (tokens[0] = coarsest)."""
    tokenizer: dict[str, Any] = dataclasses.field(default_factory=dict)
    """``checkpoint_sha256`` (hash of the weights that produced the codes) and ``config`` (full tokenizer config)."""
    image_size: int | None = None
    """Side of the square crop the tokenizer saw."""
    transform: Any = None
    """How pixels were prepared (resize, crop, alpha and small-image policies)."""
    source: Any = None
    """Where the images came from (kind, path, columns)."""
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: {"written": 0, "rejected": 0})
    """``written`` rows and ``rejected`` inputs; together they are every input."""
    rejects: list[dict[str, str]] = dataclasses.field(default_factory=list)
    """One ``{"source_id", "reason"}`` per rejected input."""
    shards: list[str] = dataclasses.field(default_factory=list)
    """Parquet file names, in global shard order (the dataset's row order)."""
    schema_version: int = SCHEMA_VERSION
    complete: bool = True
    """False while a pre-tokenization job is still running (or was interrupted: re-run it to finish)."""
    plan: dict[str, Any] = dataclasses.field(default_factory=dict)
    """``num_inputs``, ``shard_size``, ``num_shards``: the deterministic input → shard assignment."""
    duplicate_ids: dict[str, Any] = dataclasses.field(default_factory=lambda: {"count": 0, "examples": []})
    """Ids that occur in more than one row (all rows are kept; see docs/pretokenize.md)."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardManifest:
        if not isinstance(data, dict):
            raise ShardError(f"a manifest must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ShardError(f"manifest schema_version {version} is not supported (this code reads {SCHEMA_VERSION})")
        missing = [k for k in ("K", "codebook_size", "order") if k not in data]
        if missing:
            raise ShardError(f"manifest has no {', '.join(repr(k) for k in missing)} field")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def identity(self) -> dict[str, Any]:
        """The fields that identify the job (see `IDENTITY_FIELDS`), as plain JSON data."""
        return json.loads(json.dumps({k: getattr(self, k) for k in IDENTITY_FIELDS}))

    def fingerprint(self) -> str:
        """sha256 of the identity; stored in every progress record so shards of different jobs never mix."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ShardManifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ShardError(f"{path}: no manifest; is {directory} a token-shard directory written by "
                             "`python -m selftok.pretokenize`?")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ShardError(f"{path}: not valid JSON ({e})") from e


def check_manifest(manifest: ShardManifest, expect_K: int | None = None, expect_codebook_size: int | None = None,
                   expect_order: str = ORDER_AR) -> None:
    """Raise ShardError naming every mismatch between the manifest and what the caller expects."""
    problems = []
    if manifest.order != expect_order:
        problems.append(f"order is {manifest.order!r}, expected {expect_order!r} (AR order = the encoder's index "
                        "order reversed; re-run selftok.pretokenize rather than flipping by hand)")
    if expect_K is not None and manifest.K != expect_K:
        problems.append(f"K = {manifest.K} tokens per image, expected {expect_K}")
    if expect_codebook_size is not None and manifest.codebook_size != expect_codebook_size:
        problems.append(f"codebook_size = {manifest.codebook_size}, expected {expect_codebook_size}")
    if problems:
        raise ShardError("token shards do not match: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------------ writing
def shard_file_name(rank: int, shard: int) -> str:
    return f"shard-{rank:05d}-{shard:05d}.parquet"


def token_schema(K: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("tokens", pa.list_(pa.uint16(), K)),
                      ("captions", pa.list_(pa.string())), ("meta", pa.string())])


def token_table(ids: Sequence[str], tokens: np.ndarray, captions: Sequence[Sequence[str]],
                meta: Sequence[str | None] | None = None) -> pa.Table:
    """A shard table. tokens: (B, K) ``uint16`` already in AR order; captions: B lists; meta: B JSON strings."""
    tokens = np.asarray(tokens)
    if tokens.dtype != np.uint16 or tokens.ndim != 2:
        raise ShardError(f"tokens must be a (B, K) uint16 array, got {tokens.dtype} {tokens.shape}")
    B, K = tokens.shape
    meta = [None] * B if meta is None else list(meta)
    if not (len(ids) == len(captions) == len(meta) == B):
        raise ShardError(f"column lengths differ: {len(ids)} ids, {B} token rows, {len(captions)} captions, "
                         f"{len(meta)} meta")
    token_column = pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1), pa.uint16()), K)
    return pa.Table.from_arrays(
        [pa.array(list(ids), pa.string()), token_column,
         pa.array([list(c) for c in captions], pa.list_(pa.string())), pa.array(meta, pa.string())],
        schema=token_schema(K))


def write_table_atomic(table: pa.Table, path: Path, compression: str = "zstd") -> None:
    """Write `table` to `path` via a temporary name (not matching ``*.parquet``) and an atomic rename."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    pq.write_table(table, tmp, compression=compression)
    os.replace(tmp, path)


@dataclasses.dataclass
class ShardRecord:
    """Progress record of one finished shard (``progress/SSSSS.json``): its existence marks the shard done."""

    shard: int
    rank: int
    file: str | None
    """Parquet file name, or None when every input of the shard was rejected (no rows to write)."""
    written: int
    rejects: list[dict[str, str]]
    fingerprint: str
    """`ShardManifest.fingerprint` of the job that wrote it."""


def write_shard(directory: str | Path, rank: int, shard: int, table: pa.Table, rejects: list[dict[str, str]],
                fingerprint: str, compression: str = "zstd") -> ShardRecord:
    """Write shard `shard` (rows `table`, plus its `rejects`) atomically: Parquet file first, then its record.

    A run killed between the two renames leaves a Parquet file without a record: the shard is redone and the
    file overwritten with the same rows, so nothing is duplicated."""
    directory = Path(directory)
    name = shard_file_name(rank, shard) if table.num_rows else None
    if name is not None:
        write_table_atomic(table, directory / name, compression)
    record = ShardRecord(shard=shard, rank=rank, file=name, written=table.num_rows, rejects=list(rejects),
                         fingerprint=fingerprint)
    progress = directory / PROGRESS_DIR
    progress.mkdir(parents=True, exist_ok=True)
    write_atomic(progress / f"{shard:05d}.json", json.dumps(dataclasses.asdict(record)))
    return record


def read_records(directory: str | Path, fingerprint: str | None = None) -> dict[int, ShardRecord]:
    """Finished shards of a directory by global shard index; records of another job raise ShardError."""
    progress = Path(directory) / PROGRESS_DIR
    records: dict[int, ShardRecord] = {}
    for path in sorted(progress.glob("[0-9]*.json")) if progress.is_dir() else []:
        record = ShardRecord(**json.loads(path.read_text()))
        if fingerprint is not None and record.fingerprint != fingerprint:
            raise ShardError(f"{path} was written by a different pre-tokenization job (another tokenizer, source or "
                             "plan); refusing to mix. Use a new output directory.")
        if record.file is not None and not (Path(directory) / record.file).is_file():
            log.warning("%s: shard file %s is missing; the shard will be redone", path, record.file)
            continue
        records[record.shard] = record
    return records


def remove_stale_files(directory: str | Path, shards: Sequence[int]) -> None:
    """Delete leftovers of `shards` (temporary files, Parquet files without a record) before redoing them."""
    directory = Path(directory)
    wanted = {f"{s:05d}" for s in shards}
    for path in directory.glob("shard-*-*.parquet*"):
        if path.name.split("-")[2][:5] in wanted:
            path.unlink(missing_ok=True)
    for path in (directory / PROGRESS_DIR).glob("*.json.tmp*"):
        if path.name[:5] in wanted:
            path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ reading
def open_token_shards(directory: str | Path, expect_K: int | None = None, expect_codebook_size: int | None = None,
                      expect_order: str = ORDER_AR, allow_incomplete: bool = False, verify_codes: bool = True,
                      in_memory: bool = False, cache_dir: str | None = None) -> tuple[ShardManifest, Any]:
    """(manifest, ``datasets.Dataset``) of a token-shard directory, after checking it.

    Refuses (ShardError) shards whose order / K / codebook size differ from the `expect_*` values, an
    incomplete job (unless `allow_incomplete`), missing files, token columns that are not K ``uint16`` per row,
    and (with `verify_codes`, one vectorised pass) codes ≥ codebook_size. Rows follow the manifest's shard
    order. `in_memory` reads the Parquet files straight into memory instead of going through the
    memory-mapped ``datasets`` cache. Read tokens with `iter_token_batches` / `read_tokens`: the dataset's
    numpy/torch formats upcast the whole column to int64."""
    import datasets

    directory = Path(directory)
    manifest = ShardManifest.load(directory)
    check_manifest(manifest, expect_K, expect_codebook_size, expect_order)
    if not manifest.complete and not allow_incomplete:
        raise ShardError(f"{directory}: the pre-tokenization job is not complete ({manifest.counts.get('written', 0)} "
                         "rows so far); re-run the same command to finish it, or pass allow_incomplete=True")
    files = [directory / name for name in manifest.shards]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise ShardError(f"{len(absent)} shard file(s) listed in the manifest are missing: {', '.join(absent[:5])}")
    fixed_size = [_check_schema(f, manifest.K) for f in files]  # check every file, no short-circuit
    fixed = all(fixed_size)
    if not files:
        dataset = datasets.Dataset(token_schema(manifest.K).empty_table())
    elif in_memory:
        dataset = datasets.Dataset(pa.concat_tables([pq.read_table(f) for f in files]))
    else:
        dataset = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train",
                                        cache_dir=cache_dir)
    written = manifest.counts.get("written")
    if manifest.complete and written is not None and written != len(dataset):
        raise ShardError(f"{directory}: the manifest counts {written} rows but the shards hold {len(dataset)}")
    if not fixed:
        _check_row_lengths(_table(dataset), manifest.K, directory)
    if verify_codes:
        _check_code_range(_table(dataset), manifest.codebook_size, directory)
    if manifest.duplicate_ids.get("count"):
        log.warning("%s: %d ids occur in more than one row (e.g. %s)", directory, manifest.duplicate_ids["count"],
                    manifest.duplicate_ids.get("examples", [])[:3])
    return manifest, dataset


def _check_schema(path: Path, K: int) -> bool:
    """Check the columns of one file; True when tokens are a fixed-size list (a plain list<uint16> is accepted
    too, and its row lengths are checked after loading)."""
    schema = pq.read_schema(path)
    missing = [c for c in ("id", "tokens", "captions") if c not in schema.names]
    if missing:
        raise ShardError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(schema.names)})")
    tokens = schema.field("tokens").type
    fixed = pa.types.is_fixed_size_list(tokens)
    if fixed and tokens.list_size != K or not (fixed or pa.types.is_list(tokens)) or tokens.value_type != pa.uint16():
        raise ShardError(f"{path}: tokens column is {tokens}, expected fixed_size_list<uint16>[{K}]")
    return fixed


def _check_row_lengths(table: pa.Table, K: int, where: Path) -> None:
    for chunk in table.column("tokens").chunks:
        lengths = pc.list_value_length(chunk)
        if len(chunk) and (pc.min(lengths).as_py() != K or pc.max(lengths).as_py() != K or chunk.null_count):
            raise ShardError(f"{where}: token rows are not all of length K = {K}")


def _table(dataset: Any) -> pa.Table:
    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()
    return dataset.data.table


def _check_code_range(table: pa.Table, codebook_size: int, where: Path) -> None:
    column = table.column("tokens")
    if column.num_chunks == 0 or table.num_rows == 0:
        return
    top = max(pc.max(chunk.flatten()).as_py() or 0 for chunk in column.chunks if len(chunk))
    if top >= codebook_size:
        raise ShardError(f"{where}: a stored code is {top}, outside the manifest's codebook of {codebook_size}")


class TokenBatch(NamedTuple):
    ids: list[str]                # B stable sample ids
    tokens: Tensor                # (B, K) int64, AR order
    captions: list[list[str]]     # B caption lists (possibly empty)


def iter_token_batches(dataset: Any, batch_size: int) -> Iterator[TokenBatch]:
    """Consecutive batches of a token-shard dataset; tokens go uint16 → int64 per batch, never per dataset."""
    table = _table(dataset)
    for batch in table.to_batches(max_chunksize=batch_size):
        yield TokenBatch(batch.column("id").to_pylist(), _batch_tokens(batch.column("tokens")),
                         batch.column("captions").to_pylist())


def read_tokens(dataset: Any, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """(len(indices), K) ``uint16`` tokens of the given rows (AR order), gathered without decoding other rows."""
    taken = _table(dataset).column("tokens").take(pa.array(np.asarray(indices, dtype=np.int64)))
    return _uint16_rows(taken.combine_chunks() if isinstance(taken, pa.ChunkedArray) else taken)


def _batch_tokens(column: pa.Array) -> Tensor:
    return torch.from_numpy(_uint16_rows(column).astype(np.int64))


def _uint16_rows(column: pa.Array) -> np.ndarray:
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), -1 if len(column) else 0)
