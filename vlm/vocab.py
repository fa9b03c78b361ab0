"""The VLM id layout: text ids, special tokens and visual codes — the single owner of the mapping.

Layout of the model vocabulary (V rows, a multiple of `pad_multiple`)::

    [0, visual_offset)                          text ids of the base tokenizer + added special tokens
                                                (<boi>, <eoi>, <uncond>, and <bos>/<eos>/<pad> if missing)
    [visual_offset, visual_offset + codebook)   visual code c  <->  id visual_offset + c
    [visual_offset + codebook, V)               padding rows (never produced, never targets)

Visual codes are a numeric offset, not string tokens: the text tokenizer stays pure, and `vocab.json` next to
the model is all sampling needs. Codes are in AR order (`order == "ar"`): ``codes[..., 0]`` is ``v_1``, the
coarsest token, i.e. encoder index K-1; `ar_to_encoder_order` flips sampled codes back before decoding.

Sequence prefixes (shared by training in `vlm.data` and sampling in `vlm.generate`)::

    text->image prompt     <bos> caption <boi>
    unconditional prompt   <bos> <uncond> <boi>
    image->text prompt     <bos> <boi> v_1 ... v_K <eoi>
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selftok.data.shards import ShardError, ShardManifest, ar_to_encoder_order, check_manifest
from selftok.runtime.io import write_atomic

__all__ = ["Vocabulary", "VocabularyError", "ar_to_encoder_order", "encode_caption", "tokenizer_fingerprint"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
VOCAB_FILE = "vocab.json"
BOI, EOI, UNCOND = "<boi>", "<eoi>", "<uncond>"
FALLBACK_BOS, FALLBACK_EOS, FALLBACK_PAD = "<|vlm_bos|>", "<|vlm_eos|>", "<|vlm_pad|>"
OWN_TOKENS = (BOI, EOI, UNCOND, FALLBACK_BOS, FALLBACK_EOS, FALLBACK_PAD)
AR_ORDER = "ar"

CodesLike = torch.Tensor | np.ndarray | Sequence[int]


class VocabularyError(ValueError):
    """Ids, codes, manifests or saved vocabularies that do not fit the id layout."""


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """The id layout of a VLM. Build it with `Vocabulary.extend_tokenizer` or `Vocabulary.load`."""

    visual_offset: int
    """First visual id; equals the text tokenizer's length after adding the special tokens."""
    codebook_size: int
    """Number of visual codes C (from the token shards' manifest)."""
    K: int
    """Visual tokens per image."""
    order: str
    """Order of the visual tokens in sequences; only "ar" (v_1 = coarsest = encoder index K-1)."""
    bos_id: int
    eos_id: int
    pad_id: int
    boi_id: int
    eoi_id: int
    uncond_id: int
    added_ids: tuple[int, ...] = ()
    """Text-range ids of the tokens this module added (<boi>, <eoi>, <uncond>, fallback bos/eos/pad): new rows."""
    pad_multiple: int = 64
    """Embedding rows are padded to a multiple of this (tensor-core friendly shapes)."""
    text_tokenizer_sha256: str = ""
    """Hash of the extended text tokenizer's token->id table; a resume with another tokenizer is refused."""
    image_tokenizer_sha256: str = ""
    """`selftok.runtime.io.state_dict_sha256` of the Selftok tokenizer that made the training codes (from the token
    shards' manifest); `vlm.pipeline.check_pair` refuses another one. Empty = not recorded (not checked)."""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.order != AR_ORDER:
            raise VocabularyError(f"order must be {AR_ORDER!r} (tokens stored in AR order), got {self.order!r}")
        if self.codebook_size < 1 or self.K < 1 or self.pad_multiple < 1:
            raise VocabularyError(f"codebook_size, K and pad_multiple must be >= 1: {self}")
        specials = {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "boi_id": self.boi_id,
                    "eoi_id": self.eoi_id, "uncond_id": self.uncond_id}
        for name, i in specials.items():
            if not 0 <= i < self.visual_offset:
                raise VocabularyError(f"{name}={i} is not a text id (must be in [0, {self.visual_offset}))")
        if any(not 0 <= i < self.visual_offset for i in self.added_ids):
            raise VocabularyError(f"added_ids {self.added_ids} must lie in [0, {self.visual_offset})")
        if len({self.boi_id, self.eoi_id, self.uncond_id}) != 3:
            raise VocabularyError(f"<boi>, <eoi>, <uncond> must be distinct ids: {specials}")

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def visual_end(self) -> int:
        """One past the last visual id."""
        return self.visual_offset + self.codebook_size

    @property
    def model_vocab_size(self) -> int:
        """Rows of the (padded) embedding and output matrices."""
        return -(-self.visual_end // self.pad_multiple) * self.pad_multiple

    @property
    def new_ids(self) -> list[int]:
        """Rows that do not exist in the base model: the added special tokens, the visual ids and the padding."""
        return sorted(set(self.added_ids)) + list(range(self.visual_offset, self.model_vocab_size))

    @property
    def base_text_ids(self) -> list[int]:
        """Text ids of the base tokenizer (rows that extending the vocabulary must leave untouched)."""
        added = set(self.added_ids)
        return [i for i in range(self.visual_offset) if i not in added]

    # ---- codes <-> ids -------------------------------------------------------------------------------
    def codes_to_ids(self, codes: CodesLike) -> torch.Tensor | np.ndarray:
        """Visual codes in [0, codebook_size) -> LM ids; tensors stay tensors, anything else becomes int64 numpy."""
        arr = codes if isinstance(codes, torch.Tensor) else np.asarray(codes, dtype=np.int64)
        if arr.numel() if isinstance(arr, torch.Tensor) else arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.codebook_size:
                raise VocabularyError(f"visual code out of range [0, {self.codebook_size}): min {lo}, max {hi}")
        return arr.long() + self.visual_offset if isinstance(arr, torch.Tensor) else arr + self.visual_offset

    def ids_to_codes(self, ids: CodesLike) -> torch.Tensor | np.ndarray:
        """LM ids in the visual range -> codes; any id outside [visual_offset, visual_end) is an error."""
        arr = ids if isinstance(ids, torch.Tensor) else np.asarray(ids, dtype=np.int64)
        if arr.numel() if isinstance(arr, torch.Tensor) else arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self.visual_offset or hi >= self.visual_end:
                raise VocabularyError(
                    f"id outside the visual range [{self.visual_offset}, {self.visual_end}): min {lo}, max {hi}")
        return arr.long() - self.visual_offset if isinstance(arr, torch.Tensor) else arr - self.visual_offset

    def is_visual(self, ids: torch.Tensor) -> torch.Tensor:
        """Elementwise: is this id a visual code?"""
        return (ids >= self.visual_offset) & (ids < self.visual_end)

    # ---- masks over the model vocabulary -------------------------------------------------------------
    def visual_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(V,) bool, True exactly on the visual ids (what image sampling may produce)."""
        mask = torch.zeros(self.model_vocab_size, dtype=torch.bool, device=device)
        mask[self.visual_offset:self.visual_end] = True
        return mask

    def text_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(V,) bool, True on text ids a caption may contain: every id below `visual_offset` except
        <bos>, <pad>, <boi>, <eoi>, <uncond>. <eos> is allowed so that captioning can stop."""
        mask = torch.zeros(self.model_vocab_size, dtype=torch.bool, device=device)
        mask[:self.visual_offset] = True
        for i in (self.bos_id, self.pad_id, self.boi_id, self.eoi_id, self.uncond_id):
            mask[i] = False
        mask[self.eos_id] = True  # in case eos == bos (GPT-2 style tokenizers)
        return mask

    # ---- sequence prefixes ---------------------------------------------------------------------------
    def t2i_prompt(self, caption_ids: Sequence[int]) -> list[int]:
        """``<bos> caption <boi>``: what text->image sampling continues with v_1 ... v_K."""
        return [self.bos_id, *caption_ids, self.boi_id]

    def uncond_prompt(self) -> list[int]:
        """``<bos> <uncond> <boi>``: the unconditional branch of classifier-free guidance."""
        return [self.bos_id, self.uncond_id, self.boi_id]

    def i2t_prompt(self, codes: CodesLike) -> list[int]:
        """``<bos> <boi> v_1 ... v_K <eoi>`` for K AR-ordered codes: what captioning continues with text."""
        flat = np.asarray(codes.detach().cpu() if isinstance(codes, torch.Tensor) else codes, dtype=np.int64)
        flat = flat.reshape(-1)
        if flat.size != self.K:
            raise VocabularyError(f"expected K={self.K} codes for one image, got {flat.size}")
        return [self.bos_id, self.boi_id, *self.codes_to_ids(flat).tolist(), self.eoi_id]

    # ---- contract checks -----------------------------------------------------------------------------
    def check_manifest(self, manifest: Any) -> None:
        """Refuse token shards whose manifest (ShardManifest or dict) disagrees on order, K or codebook size."""
        if not isinstance(manifest, ShardManifest):
            try:
                manifest = ShardManifest.from_dict(dict(manifest))
            except ShardError as e:
                raise VocabularyError(f"not a usable token-shard manifest: {e}") from e
        try:
            check_manifest(manifest, expect_K=self.K, expect_codebook_size=self.codebook_size, expect_order=self.order)
        except ShardError as e:
            raise VocabularyError(
                f"{e}. The model's vocabulary was built for other token shards: pre-tokenize with the tokenizer "
                "this model was built for, or build a new vocabulary from these shards.") from e

    def check_same(self, other: Vocabulary, what: str = "checkpoint") -> None:
        """Refuse to continue (resume, load an adapter) with a different id layout."""
        diffs = [f"{f.name}: {getattr(other, f.name)!r} (saved) != {getattr(self, f.name)!r} (current)"
                 for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]
        if diffs:
            raise VocabularyError(f"the {what} was made with a different vocabulary; refusing: " + "; ".join(diffs))

    # ---- persistence ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_vocab_size"] = self.model_vocab_size  # informative; recomputed on load
        return d

    def save(self, directory: str | Path) -> Path:
        """Write ``vocab.json`` atomically into `directory`."""
        path = Path(directory) / VOCAB_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Vocabulary:
        """Read ``vocab.json`` from `directory` (or the file itself); unknown keys are errors."""
        path = Path(directory)
        path = path / VOCAB_FILE if path.is_dir() else path
        data = json.loads(path.read_text())
        saved_size = data.pop("model_vocab_size", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise VocabularyError(f"{path}: unknown keys {unknown}")
        if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise VocabularyError(f"{path}: schema_version {data['schema_version']} != {SCHEMA_VERSION}")
        data["added_ids"] = tuple(data.get("added_ids", ()))
        vocab = cls(**data)
        if saved_size is not None and saved_size != vocab.model_vocab_size:
            raise VocabularyError(f"{path}: model_vocab_size {saved_size} != recomputed {vocab.model_vocab_size}")
        return vocab

    # ---- construction from a tokenizer ---------------------------------------------------------------
    @classmethod
    def extend_tokenizer(cls, tokenizer: Any, codebook_size: int, K: int, order: str = AR_ORDER,
                         pad_multiple: int = 64, image_tokenizer_sha256: str = "") -> Vocabulary:
        """Add <boi>/<eoi>/<uncond> (and a missing <bos>/<eos>/<pad>) to a HF tokenizer in place; return the layout.

        Idempotent: calling it again on an already extended tokenizer adds nothing and gives the same layout."""
        missing = {}
        for attr, fallback in (("bos_token", FALLBACK_BOS), ("eos_token", FALLBACK_EOS),
                               ("pad_token", FALLBACK_PAD)):
            if getattr(tokenizer, attr, None) is None:
                missing[attr] = fallback
        if missing:
            log.warning("base tokenizer lacks %s; adding them as special tokens", sorted(missing))
            tokenizer.add_special_tokens(missing)
        new = [t for t in (BOI, EOI, UNCOND) if t not in tokenizer.get_vocab()]
        if new:
            tokenizer.add_tokens(new, special_tokens=True)  # same call in transformers 4.x and 5.x
        ids = tokenizer.convert_tokens_to_ids([BOI, EOI, UNCOND])
        table = tokenizer.get_vocab()
        added = tuple(sorted(table[t] for t in OWN_TOKENS if t in table))
        return cls(visual_offset=len(tokenizer), codebook_size=codebook_size, K=K, order=order,
                   bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                   boi_id=ids[0], eoi_id=ids[1], uncond_id=ids[2], added_ids=added, pad_multiple=pad_multiple,
                   text_tokenizer_sha256=tokenizer_fingerprint(tokenizer),
                   image_tokenizer_sha256=image_tokenizer_sha256)

    @classmethod
    def from_manifest(cls, tokenizer: Any, manifest: Any, pad_multiple: int = 64) -> Vocabulary:
        """`extend_tokenizer` with K, codebook size and order read from a token-shard manifest (object or dict)."""
        if not isinstance(manifest, ShardManifest):
            manifest = ShardManifest.from_dict(dict(manifest))
        return cls.extend_tokenizer(tokenizer, codebook_size=manifest.codebook_size, K=manifest.K,
                                    order=manifest.order, pad_multiple=pad_multiple,
                                    image_tokenizer_sha256=(manifest.tokenizer or {}).get("checkpoint_sha256") or "")


def encode_caption(tokenizer: Any, caption: str) -> list[int]:
    """Caption text -> text ids without <bos>/<eos>; special-token strings inside a caption are split as text."""
    return list(tokenizer(caption, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the token->id table (including added tokens): equal tables give equal text ids."""
    table = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(table, ensure_ascii=False).encode()).hexdigest()
