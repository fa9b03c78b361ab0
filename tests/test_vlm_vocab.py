"""vlm.vocab and vlm.text_tokenizer: the id layout, code<->id mapping, masks, prompts, manifests, persistence."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from vlm_testutil import CAPTIONS, one_thread  # noqa: F401 (autouse fixture)

from vlm.text_tokenizer import load_text_tokenizer, train_text_tokenizer
from vlm.vocab import BOI, EOI, UNCOND, Vocabulary, VocabularyError, encode_caption


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_text_tokenizer(CAPTIONS, d, vocab_size=400)
    return d


@pytest.fixture()
def tokenizer(text_dir):
    return load_text_tokenizer(text_dir)


def test_text_tokenizer_is_deterministic_and_matches_sentencepiece(tmp_path, text_dir):
    import sentencepiece as spm
    train_text_tokenizer(list(reversed(CAPTIONS)) * 3, tmp_path, vocab_size=400)  # order/multiplicity-free
    assert (tmp_path / "tokenizer.model").read_bytes() == (text_dir / "tokenizer.model").read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(text_dir / "tokenizer.model"))
    hf = load_text_tokenizer(text_dir)
    for text in ("a red circle left of a blue square", "3 purple diamonds", "an ünïcode caption"):
        assert encode_caption(hf, text) == sp.encode(text)
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)


def test_layout_and_idempotent_extension(tokenizer):
    n_text = len(tokenizer)
    vocab = Vocabulary.extend_tokenizer(tokenizer, codebook_size=1000, K=32)
    assert len(tokenizer) == n_text + 3 == vocab.visual_offset
    assert tokenizer.convert_tokens_to_ids([BOI, EOI, UNCOND]) == [vocab.boi_id, vocab.eoi_id, vocab.uncond_id]
    assert sorted(vocab.added_ids) == [n_text, n_text + 1, n_text + 2]
    assert vocab.visual_end == vocab.visual_offset + 1000
    assert vocab.model_vocab_size % 64 == 0 and 0 <= vocab.model_vocab_size - vocab.visual_end < 64
    assert (vocab.bos_id, vocab.eos_id, vocab.pad_id) == (1, 2, 3)
    assert Vocabulary.extend_tokenizer(tokenizer, codebook_size=1000, K=32) == vocab  # nothing added twice
    assert len(tokenizer) == n_text + 3
    assert set(vocab.new_ids) == set(vocab.added_ids) | set(range(vocab.visual_offset, vocab.model_vocab_size))
    assert set(vocab.base_text_ids) == set(range(n_text))


def test_codes_ids_round_trip_and_range_errors(tokenizer):
    vocab = Vocabulary.extend_tokenizer(tokenizer, codebook_size=300, K=4)
    codes = torch.arange(300)
    ids = vocab.codes_to_ids(codes)
    assert ids[0] == vocab.visual_offset and ids[-1] == vocab.visual_end - 1
    assert torch.equal(vocab.ids_to_codes(ids), codes)
    assert np.array_equal(vocab.ids_to_codes(vocab.codes_to_ids([5, 0, 299])), [5, 0, 299])
    assert vocab.is_visual(ids).all() and not vocab.is_visual(torch.tensor([vocab.eoi_id, vocab.visual_end])).any()
    for bad in ([300], [-1]):
        with pytest.raises(VocabularyError, match="visual code out of range"):
            vocab.codes_to_ids(bad)
    for bad in ([vocab.visual_offset - 1], [vocab.visual_end], [vocab.boi_id]):
        with pytest.raises(VocabularyError, match="outside the visual range"):
            vocab.ids_to_codes(torch.tensor(bad))


def test_masks(tokenizer):
    vocab = Vocabulary.extend_tokenizer(tokenizer, codebook_size=100, K=4)
    vis, txt = vocab.visual_mask(), vocab.text_mask()
    assert vis.shape == txt.shape == (vocab.model_vocab_size,)
    assert vis.nonzero().flatten().tolist() == list(range(vocab.visual_offset, vocab.visual_end))
    assert not (vis & txt).any()
    for special in (vocab.bos_id, vocab.pad_id, vocab.boi_id, vocab.eoi_id, vocab.uncond_id):
        assert not txt[special]
    assert txt[vocab.eos_id] and txt[encode_caption(tokenizer, "red")[0]]
    assert not txt[vocab.visual_end:].any()  # padding rows are in neither mask


def test_prompts(tokenizer):
    vocab = Vocabulary.extend_tokenizer(tokenizer, codebook_size=50, K=3)
    cap = encode_caption(tokenizer, "a red circle")
    assert vocab.t2i_prompt(cap) == [vocab.bos_id, *cap, vocab.boi_id]
    assert vocab.uncond_prompt() == [vocab.bos_id, vocab.uncond_id, vocab.boi_id]
    o = vocab.visual_offset
    assert vocab.i2t_prompt(torch.tensor([7, 0, 49])) == [vocab.bos_id, vocab.boi_id, o + 7, o, o + 49, vocab.eoi_id]
    with pytest.raises(VocabularyError, match="expected K=3"):
        vocab.i2t_prompt([1, 2])
    with pytest.raises(VocabularyError, match="out of range"):
        vocab.i2t_prompt([1, 2, 50])
    # a caption that spells a special token is text, not <boi>
    assert vocab.boi_id not in encode_caption(tokenizer, "a <boi> circle")


def test_save_load_and_check_same(tokenizer, tmp_path):
    vocab = Vocabulary.extend_tokenizer(tokenizer, codebook_size=64, K=16)
    vocab.save(tmp_path)
    data = json.loads((tmp_path / "vocab.json").read_text())
    assert data["model_vocab_size"] == vocab.model_vocab_size and data["visual_offset"] == vocab.visual_offset
    assert Vocabulary.load(tmp_path) == vocab == Vocabulary.load(tmp_path / "vocab.json")
    other = Vocabulary.extend_tokenizer(tokenizer, codebook_size=65, K=16)
    with pytest.raises(VocabularyError, match="codebook_size: 64 .saved. != 65"):
        other.check_same(vocab)
    data["surprise"] = 1
    (tmp_path / "vocab.json").write_text(json.dumps(data))
    with pytest.raises(VocabularyError, match="unknown keys"):
        Vocabulary.load(tmp_path)


@pytest.mark.parametrize("field,value,message", [("order", "encoder", "order is 'encoder'"),
                                                 ("K", 17, "K = 17"), ("codebook_size", 63, "codebook_size = 63")])
def test_manifest_mismatch_refused(tokenizer, field, value, message):
    vocab = Vocabulary.extend_tokenizer(tokenizer, codebook_size=64, K=16)
    manifest = {"schema_version": 1, "K": 16, "codebook_size": 64, "order": "ar"}
    vocab.check_manifest(manifest)
    with pytest.raises(VocabularyError, match=message):
        vocab.check_manifest({**manifest, field: value})


def test_tokenizer_without_bos_eos_pad_gets_them(tmp_path):
    words = ["a", "red", "circle", "[UNK]"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    assert tok.bos_token is None and tok.eos_token is None and tok.pad_token is None
    vocab = Vocabulary.extend_tokenizer(tok, codebook_size=10, K=2)
    assert len({vocab.bos_id, vocab.eos_id, vocab.pad_id, vocab.boi_id, vocab.eoi_id, vocab.uncond_id}) == 6
    assert min(vocab.added_ids) == len(words) and len(vocab.added_ids) == 6
    assert vocab.t2i_prompt(encode_caption(tok, "a red circle")) == [vocab.bos_id, 0, 1, 2, vocab.boi_id]
    tok.save_pretrained(tmp_path)  # the fallback tokens survive a save/load and give the same layout
    assert Vocabulary.extend_tokenizer(load_text_tokenizer(tmp_path), codebook_size=10, K=2) == vocab


def test_invalid_layouts_rejected():
    good = {"visual_offset": 10, "codebook_size": 5, "K": 2, "order": "ar", "bos_id": 1, "eos_id": 2, "pad_id": 3,
            "boi_id": 7, "eoi_id": 8, "uncond_id": 9}
    Vocabulary(**good)
    with pytest.raises(VocabularyError, match="order"):
        Vocabulary(**{**good, "order": "encoder"})
    with pytest.raises(VocabularyError, match="boi_id=10 is not a text id"):
        Vocabulary(**{**good, "boi_id": 10})
    with pytest.raises(VocabularyError, match="distinct"):
        Vocabulary(**{**good, "eoi_id": 7})
