"""A small text tokenizer trained deterministically with sentencepiece (the shapes world's base tokenizer).

The settings give exact id parity between `sentencepiece` and the Hugging Face `LlamaTokenizer` loaded from the
same model file: BPE, identity normalisation, byte fallback, digits split,
``<unk>=0 <s>=1 </s>=2 <pad>=3``. Training reads the sorted set of distinct captions on one thread, so the same
captions give the same tokenizer byte for byte whatever their order or multiplicity.
"""
from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MODEL_FILE = "tokenizer.model"
# 4 control/unk pieces + 256 byte-fallback pieces are always present.
RESERVED_PIECES = 260


def train_text_tokenizer(captions: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """Train a BPE sentencepiece model on `captions`, save it as a HF tokenizer in `out_dir`, and return it.

    `vocab_size` is an upper bound: a small caption grammar yields fewer pieces (``hard_vocab_limit=False``)."""
    corpus = sorted({c.strip() for c in captions if c and c.strip()})
    if not corpus:
        raise ValueError("cannot train a text tokenizer: no non-empty captions")
    if vocab_size <= RESERVED_PIECES:
        raise ValueError(f"vocab_size must exceed {RESERVED_PIECES} (byte fallback + specials), got {vocab_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, minloglevel=2)
    (out_dir / MODEL_FILE).write_bytes(model.getvalue())
    # transformers 5: LlamaTokenizer(vocab_file=...) builds an empty tokenizer; from_pretrained(folder) works.
    tokenizer = LlamaTokenizer.from_pretrained(str(out_dir), pad_token="<pad>")
    tokenizer.save_pretrained(str(out_dir))
    log.info("trained a %d-piece text tokenizer on %d distinct captions -> %s", len(tokenizer), len(corpus), out_dir)
    return tokenizer


def load_text_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a base tokenizer from a local folder (never downloads)."""
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
