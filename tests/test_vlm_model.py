"""vlm.model: vocabulary extension, training modes (full / new_rows / LoRA), export and save/load."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from vlm_testutil import one_thread  # noqa: F401 (autouse fixture)

from vlm.data import IGNORE
from vlm.loss import next_token_loss_sums
from vlm.model import (
    LlamaSpec,
    LoraSpec,
    ModelConfig,
    build_model,
    count_matmul_params,
    export_model,
    extend_model_vocab,
)
from vlm.vocab import Vocabulary

N_TEXT = 100  # base tokenizer size; specials at 100..102, visual ids from 103


def make_vocab(codebook_size: int = 90) -> Vocabulary:
    return Vocabulary(visual_offset=N_TEXT + 3, codebook_size=codebook_size, K=4, order="ar", bos_id=1, eos_id=2,
                      pad_id=3, boi_id=N_TEXT, eoi_id=N_TEXT + 1, uncond_id=N_TEXT + 2,
                      added_ids=(N_TEXT, N_TEXT + 1, N_TEXT + 2))


def tiny_cfg(**kw) -> ModelConfig:
    spec = LlamaSpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                     max_position_embeddings=64)
    return ModelConfig(llama=spec, lora=LoraSpec(r=4, alpha=8), **kw)


def save_base(tmp_path, tie: bool = False):
    """A 'pretrained' base model on disk whose vocabulary is the tokenizer's (N_TEXT + 3 rows incl. specials)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=N_TEXT + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    return model


def batch(vocab: Vocabulary, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(4, N_TEXT, (3, 6), generator=g),
                     torch.full((3, 1), vocab.boi_id),
                     torch.randint(vocab.visual_offset, vocab.visual_end, (3, 8), generator=g)], 1)
    labels = ids.clone()
    labels[:, :7] = IGNORE
    labels[0, 7:9] = ids[0, 7:9]
    task = torch.zeros_like(ids)
    return {"input_ids": ids, "labels": labels, "task": task}


def train_steps(model, vocab, steps: int = 2, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for s in range(steps):
        b = batch(vocab, s)
        out = model(input_ids=b["input_ids"], use_cache=False)
        sums = next_token_loss_sums(out.logits, b["labels"], b["task"])
        (sums.total / sums.counts.sum()).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("tie", [False, True])
def test_extension_keeps_text_rows_and_mean_initialises_new_rows(tmp_path, tie):
    base = save_base(tmp_path, tie)
    vocab = make_vocab()
    model = build_model(ModelConfig(base_model=str(tmp_path)), vocab)
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == out.shape[0] == vocab.model_vocab_size == 256
    assert (out is emb) == tie
    old_emb, old_out = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    text = torch.tensor(vocab.base_text_ids)
    assert torch.equal(emb[text], old_emb[text]) and torch.equal(out[text], old_out[text])
    new = torch.tensor(vocab.new_ids)
    assert torch.allclose(emb[new], old_emb[text].mean(0).expand(len(new), -1), atol=1e-7)
    assert torch.allclose(out[new], old_out[text].mean(0).expand(len(new), -1), atol=1e-7)
    # the added special rows (trained or not in the base) were re-initialised too
    assert torch.equal(emb[vocab.boi_id], emb[vocab.visual_offset])


def test_extension_refuses_a_model_with_more_rows(tmp_path):
    save_base(tmp_path)
    small = make_vocab(codebook_size=1)  # model_vocab_size 128 > 103 rows: fine
    build_model(ModelConfig(base_model=str(tmp_path)), small)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    model.resize_token_embeddings(320)
    with pytest.raises(ValueError, match="more than the extended vocabulary"):
        extend_model_vocab(model, small)


@pytest.mark.parametrize("mode", ["full", "new_rows", "lora"])
def test_two_steps_change_every_trainable_and_no_frozen_parameter(mode):
    vocab = make_vocab()
    torch.manual_seed(0)
    model = build_model(tiny_cfg(mode=mode), vocab)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and (mode == "full") == (len(trainable) == len(before))
    train_steps(model, vocab)
    after = dict(model.named_parameters())
    unchanged = sorted(n for n in trainable if torch.equal(before[n], after[n]))
    changed_frozen = sorted(n for n in before if n not in trainable and not torch.equal(before[n], after[n]))
    assert unchanged == [] and changed_frozen == []


@pytest.mark.parametrize("mode", ["new_rows", "lora"])
def test_adapters_keep_base_weights_bit_identical_while_new_rows_move(mode):
    vocab = make_vocab()
    torch.manual_seed(0)
    model = build_model(tiny_cfg(mode=mode), vocab)
    assert isinstance(model, PeftModel)
    base0 = {n: p.detach().clone() for n, p in model.get_base_model().state_dict().items()}
    train_steps(model, vocab)
    base1 = model.get_base_model().state_dict()
    # the wrapped base layers never change; only adapter / delta tensors do
    assert all(torch.equal(base0[n], base1[n]) for n in base0 if "lora_" not in n and "delta" not in n)
    merged = export_model(model)
    text, new = torch.tensor(vocab.base_text_ids), torch.tensor(vocab.new_ids)
    key = {n.replace(".token_adapter.base_layer", "").replace(".base_layer", ""): n for n in base0}
    # the last position of a row has no target after it, so its input row gets no gradient
    seen = set(torch.cat([batch(vocab, s)["input_ids"][:, :-1].flatten() for s in (0, 1)]).tolist())
    fed = torch.tensor([i in seen for i in vocab.new_ids])
    for name, w, should_move in (("model.embed_tokens.weight", merged.get_input_embeddings().weight, fed),
                                 ("lm_head.weight", merged.get_output_embeddings().weight, torch.ones_like(fed))):
        w0 = base0[key[name]]
        assert torch.equal(w[text], w0[text]), f"{name}: text rows changed"
        moved = (w[new] != w0[new]).any(1)
        # input rows move exactly where the id was fed; every output row gets a softmax gradient
        assert torch.equal(moved, should_move), f"{name}: new rows moved {moved.sum()} != {should_move.sum()}"
    if mode == "new_rows":  # nothing else exists to change
        for n, p in merged.state_dict().items():
            if "embed_tokens" not in n and "lm_head" not in n:
                assert torch.equal(p, base0[key[n]]), n


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_save_pretrained_from_pretrained_identical_logits(tmp_path, mode):
    vocab = make_vocab()
    torch.manual_seed(0)
    model = build_model(tiny_cfg(mode=mode), vocab)
    train_steps(model, vocab)
    model = export_model(model).eval()
    ids = batch(vocab, 5)["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LlamaForCausalLM and loaded.config.vocab_size == vocab.model_vocab_size
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)


def test_gradient_checkpointing_gives_the_same_gradients():
    vocab = make_vocab()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_cfg(gradient_checkpointing=ckpt), vocab)
        model.train()
        b = batch(vocab)
        next_token_loss_sums(model(input_ids=b["input_ids"], use_cache=False).logits, b["labels"],
                             b["task"]).total.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_count_matmul_params():
    vocab = make_vocab()
    model = build_model(tiny_cfg(), vocab)
    emb = model.get_input_embeddings().weight.numel()
    assert count_matmul_params(model) == sum(p.numel() for p in model.parameters()) - emb
