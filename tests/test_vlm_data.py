"""vlm.data and vlm.loss: hand-checked sequences, truncation, bad input, packing, the deterministic stream."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from vlm_testutil import CAPTIONS, one_thread, write_shards  # noqa: F401 (autouse fixture)

from selftok.data.shards import ShardError, open_token_shards
from vlm.data import (
    I2T,
    IGNORE,
    T2I,
    TEXT,
    DataConfig,
    MixedStream,
    SampleTooLong,
    TokenSource,
    collate_packed,
    collate_padded,
    epoch_plan,
    i2t_sample,
    loss_token_count,
    pack_rows,
    t2i_sample,
    text_sample,
)
from vlm.loss import backward_scale, next_token_loss_sums
from vlm.model import LlamaSpec, ModelConfig, build_model
from vlm.text_tokenizer import train_text_tokenizer
from vlm.vocab import Vocabulary, VocabularyError

X = IGNORE
# text ids < 100; <boi>=100 <eoi>=101 <uncond>=102; visual code c -> 103 + c; <bos>=1 <eos>=2 <pad>=3
VOCAB = Vocabulary(visual_offset=103, codebook_size=20, K=3, order="ar", bos_id=1, eos_id=2, pad_id=3, boi_id=100,
                   eoi_id=101, uncond_id=102, added_ids=(100, 101, 102))
CAP, CODES = [10, 11], np.array([5, 0, 7])


def test_hand_checked_sequences():
    s = t2i_sample(VOCAB, CAP, CODES, max_len=32)
    assert s.input_ids == [1, 10, 11, 100, 108, 103, 110, 101, 2]
    assert s.labels == [X, X, X, X, 108, 103, 110, 101, 2] and s.task == T2I
    s = t2i_sample(VOCAB, None, CODES, max_len=32)
    assert s.input_ids == [1, 102, 100, 108, 103, 110, 101, 2]
    assert s.labels == [X, X, X, 108, 103, 110, 101, 2]
    s = i2t_sample(VOCAB, CODES, CAP, max_len=32)
    assert s.input_ids == [1, 100, 108, 103, 110, 101, 10, 11, 2]
    assert s.labels == [X, X, X, X, X, X, 10, 11, 2] and s.task == I2T
    s = text_sample(VOCAB, CAP, max_len=32)
    assert (s.input_ids, s.labels, s.task) == ([1, 10, 11, 2], [X, 10, 11, 2], TEXT)
    # the loss mask as the model sees it (targets shifted by one): t2i predicts v_1 from <boi>
    b = collate_padded([t2i_sample(VOCAB, CAP, CODES, 32)], VOCAB.pad_id)
    assert (b["labels"][0, 1:] != X).nonzero().flatten().tolist() == [3, 4, 5, 6, 7]
    assert loss_token_count(b) == 5


def test_truncation_keeps_image_tokens_and_rejects_what_cannot_fit():
    long = list(range(10, 40))
    s = t2i_sample(VOCAB, long, CODES, max_len=8)  # K + 4 specials leave one caption token
    assert s.input_ids == [1, 10, 100, 108, 103, 110, 101, 2]
    s = i2t_sample(VOCAB, CODES, long, max_len=8)  # caption cut: no <eos> target after a cut caption
    assert s.input_ids == [1, 100, 108, 103, 110, 101, 10, 11] and s.labels[-2:] == [10, 11]
    assert len(text_sample(VOCAB, long, max_len=8).input_ids) == 8
    with pytest.raises(SampleTooLong, match="at least 8"):
        t2i_sample(VOCAB, CAP, CODES, max_len=7)
    with pytest.raises(SampleTooLong, match="at least 7"):
        i2t_sample(VOCAB, CODES, CAP, max_len=6)


def test_bad_inputs():
    assert t2i_sample(VOCAB, [], CODES, 32).input_ids[:3] == [1, 102, 100]  # empty caption = unconditional
    with pytest.raises(ValueError, match="non-empty caption"):
        i2t_sample(VOCAB, CODES, [], 32)
    with pytest.raises(ValueError, match="non-empty caption"):
        text_sample(VOCAB, [], 32)
    with pytest.raises(VocabularyError, match="out of range"):
        t2i_sample(VOCAB, CAP, np.array([5, 20, 7]), 32)
    with pytest.raises(VocabularyError, match="expected K=3"):
        t2i_sample(VOCAB, CAP, np.array([5, 7]), 32)


def test_loss_sums_analytic():
    """Zero logits: every loss token costs log V; sums and counts split by the task of the target token."""
    a, b = t2i_sample(VOCAB, CAP, CODES, 32), i2t_sample(VOCAB, CODES, CAP, 32)
    batch = collate_padded([a, b], VOCAB.pad_id)
    V = 128
    sums = next_token_loss_sums(torch.zeros(2, batch["input_ids"].shape[1], V), batch["labels"], batch["task"])
    assert sums.counts.tolist() == [5, 3, 0]
    assert torch.allclose(sums.per_task, torch.tensor([5, 3, 0]) * math.log(V))
    assert torch.isclose(sums.total, torch.tensor(8 * math.log(V)))


def tiny_model(vocab):
    torch.manual_seed(0)
    spec = LlamaSpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                     max_position_embeddings=64)
    return build_model(ModelConfig(llama=spec), vocab)


def test_packed_rows_match_separate_samples():
    samples = [t2i_sample(VOCAB, CAP, CODES, 32), i2t_sample(VOCAB, np.array([1, 2, 3]), [12, 13, 14], 32),
               t2i_sample(VOCAB, None, np.array([9, 9, 1]), 32)]
    model = tiny_model(VOCAB).eval()
    packed = collate_packed([samples], VOCAB.pad_id, max_len=32)
    assert packed["position_ids"][0, :12].tolist() == list(range(9)) + [0, 1, 2]
    with torch.no_grad():
        logits = model(**packed.model_inputs(), use_cache=False).logits[0]
        at = 0
        for s in samples:
            alone = model(input_ids=torch.tensor([s.input_ids]), use_cache=False).logits[0]
            assert torch.allclose(logits[at:at + len(s.input_ids)], alone, atol=1e-5)
            at += len(s.input_ids)


def test_backward_scale_makes_accumulation_equal_the_full_batch():
    """Micro-batch sums scaled by W·A/N_global, then divided by A (as accelerate does), sum to the full-batch
    token-mean gradient."""
    samples = [t2i_sample(VOCAB, CAP, CODES, 32), i2t_sample(VOCAB, CODES, [12, 13, 14, 15], 32),
               t2i_sample(VOCAB, [12], np.array([1, 2, 3]), 32), text_sample(VOCAB, [20, 21, 22], 32)]
    model = tiny_model(VOCAB)

    def grads(micro_batches):
        model.zero_grad()
        n = sum(loss_token_count(b) for b in micro_batches)
        for b in micro_batches:
            out = model(**b.model_inputs(), use_cache=False)
            loss = next_token_loss_sums(out.logits, b["labels"], b["task"]).total
            (loss * backward_scale(n, world_size=1, accumulation_steps=len(micro_batches)) / len(micro_batches)
             ).backward()
        return [p.grad.clone() for p in model.parameters()]

    full = grads([collate_padded(samples, VOCAB.pad_id)])
    accumulated = grads([collate_padded(samples[:1], VOCAB.pad_id), collate_padded(samples[1:], VOCAB.pad_id)])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(full, accumulated))


def test_pack_rows():
    assert pack_rows([3, 3, 3, 5, 2], n_rows=2, max_len=8) == [[0, 1], [2, 3]]
    assert pack_rows([3, 3], n_rows=4, max_len=8) == [[0, 1]]
    with pytest.raises(SampleTooLong):
        pack_rows([9], 1, 8)


# ------------------------------------------------------------------------------------------ the stream
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_shards(root / "shards", n=60, K=8, codebook_size=40)
    manifest, ds = open_token_shards(root / "shards")
    tokenizer = train_text_tokenizer(CAPTIONS, root / "tok", vocab_size=400)
    vocab = Vocabulary.from_manifest(tokenizer, manifest)
    return TokenSource(ds), vocab, tokenizer


def make_stream(shards, rank=0, world=1, micro=4, **kw):
    source, vocab, tokenizer = shards
    return MixedStream(source, vocab, tokenizer, DataConfig(max_len=32, **kw), micro, rank, world)


def test_stream_is_deterministic_resumable_and_splits_ranks(shards):
    a, b = make_stream(shards), make_stream(shards)
    first = [a.next_batch() for _ in range(3)]
    assert a.state_dict() == {"position": 12}
    for (x, n), (y, m) in zip(first, [b.next_batch() for _ in range(3)]):
        assert n == m and all(torch.equal(x[k], y[k]) for k in x)
    c = make_stream(shards)
    c.load_state_dict({"position": 8})
    assert torch.equal(c.next_batch()[0]["input_ids"], first[2][0]["input_ids"])
    # two ranks with micro 2 see exactly the rows of one process with micro 4, and the same global count
    r0, r1 = make_stream(shards, 0, 2, micro=2), make_stream(shards, 1, 2, micro=2)
    for full, n in first:
        (x0, n0), (x1, n1) = r0.next_batch(), r1.next_batch()
        assert n0 == n1 == n
        assert torch.equal(torch.cat([x0["input_ids"], x1["input_ids"]]), full["input_ids"])


def test_stream_mixing_dropout_and_uncaptioned_images(shards):
    source, vocab, _ = shards
    plan = epoch_plan(0, 0, 30000, (3.0, 1.0, 0.0), 0.1)
    assert abs((plan.task == T2I).mean() - 0.75) < 0.01 and (plan.task == TEXT).sum() == 0
    assert abs(plan.drop.mean() - 0.1) < 0.01
    stream = make_stream(shards, t2i_weight=1.0, i2t_weight=1.0, text_weight=1.0, cond_dropout=0.5)
    samples = stream.samples(range(len(source)))
    tasks = [s.task for s in samples]
    assert {T2I, I2T, TEXT} <= set(tasks)
    uncond = [s for s in samples if s.input_ids[1] == vocab.uncond_id]
    assert uncond and all(s.task == T2I for s in uncond)
    # images without a caption (every 11th) only ever appear as unconditional t2i samples
    _, captions, _ = source.rows(range(len(source)))
    perm = epoch_plan(0, 0, len(source), (1.0, 1.0, 1.0), 0.5).perm
    bare = [j for j, index in enumerate(perm) if not captions[index]]
    assert len(bare) == 6
    assert all(samples[j].task == T2I and samples[j].input_ids[1] == vocab.uncond_id for j in bare)


def test_packed_stream_loses_and_duplicates_nothing(shards):
    stream = make_stream(shards, packing=True, micro=2)
    reference = make_stream(shards)
    seen = []
    for _ in range(4):
        batch, n = stream.next_batch()
        assert batch["input_ids"].shape == (2, 32) and n == loss_token_count(batch)
        for row, pos in zip(batch["input_ids"], batch["position_ids"]):
            starts = (pos == 0).nonzero().flatten().tolist() + [32]
            seen += [row[s:e].tolist() for s, e in itertools.pairwise(starts) if row[s] == stream.vocab.bos_id]
    expected = [s.input_ids for s in reference.samples(range(stream.position))]
    assert seen == expected


def test_shards_with_bad_codes_are_refused(tmp_path):
    write_shards(tmp_path / "s", n=10, K=4, codebook_size=40)
    manifest = (tmp_path / "s" / "manifest.json")
    manifest.write_text(manifest.read_text().replace('"codebook_size": 40', '"codebook_size": 30'))
    with pytest.raises(ShardError, match="outside the manifest's codebook"):
        open_token_shards(tmp_path / "s")


def test_unigram_entropy():
    """Targets {108,103,110,101,2} once each (t2i): log 5; i2t targets 10, 10, 2: -(2/3 ln 2/3 + 1/3 ln 1/3)."""
    from vlm.loss import unigram_entropy
    ent = unigram_entropy([t2i_sample(VOCAB, CAP, CODES, 32), i2t_sample(VOCAB, CODES, [10, 10], 32)])
    assert math.isclose(ent["t2i"], math.log(5))
    assert math.isclose(ent["i2t"], -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert "text" not in ent
