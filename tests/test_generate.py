"""The sampler: KV cache vs full forward, CFG in one batch, visual-only image spans, seeds independent of the
batch, teacher-forced scoring equal to the sampler's log-probs, prompts, captions, decoding order."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from selftok.runtime.io import state_dict_sha256
from vlm.sampler import (
    generate_image_tokens,
    generate_text,
    left_pad,
    position_ids,
    sample_tokens,
    score_tokens,
    t2i_prompt_ids,
)
from vlm.sampling import SamplingPolicy, policy_logprobs, sample_from_logprobs
from vlm.vocab import Vocabulary


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster when the cores are shared (no spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WORDS = ["a", "an", "the", "red", "green", "blue", "yellow", "circle", "square", "triangle", "left", "right", "of",
         "above", "below", "one", "two", "three"]


@pytest.fixture(scope="module")
def text_tokenizer():
    table = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def vocab(text_tokenizer):
    return Vocabulary.extend_tokenizer(text_tokenizer, codebook_size=40, K=8)


def tiny_llama(vocab_size: int, seed: int = 0, context: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(vocab):
    return tiny_llama(vocab.model_vocab_size)


PROMPTS = [[1, 5, 6, 7, 8], [1, 9], [1, 4, 4, 4, 4, 4, 4, 4, 10]]  # different lengths: left padding matters
UNCOND = [[1, 2]] * 3


def test_kv_cached_logits_match_an_uncached_forward(model):
    """Every logit row the cached loop computed equals a full forward over the final sequence (atol 1e-4)."""
    captured = []
    hook = model.register_forward_hook(lambda mod, args, kwargs_out: captured.append(kwargs_out.logits[:, -1]))
    try:
        policy = SamplingPolicy(cfg_scale=2.5, vocabulary="all")
        out = sample_tokens(model, PROMPTS, policy, None, 6, [1, 2, 3], pad_id=0, uncond_prompts=UNCOND)
    finally:
        hook.remove()
    cached = torch.stack(captured, dim=1)  # (2B, T, V); forward t predicts token t
    assert cached.shape[:2] == (6, 6)
    rows = [p + out.token_ids[i % 3].tolist() for i, p in enumerate(PROMPTS + UNCOND)]
    for i, row in enumerate(rows):  # one row at a time, no padding, no cache
        full = model(input_ids=torch.tensor([row]), use_cache=False).logits[0, -7:-1]
        torch.testing.assert_close(cached[i], full, atol=1e-4, rtol=0)


def test_guidance_runs_cond_and_uncond_in_one_forward(model):
    batches = []
    hook = model.register_forward_hook(lambda mod, args, kw, out: batches.append(kw["input_ids"].shape[0]),
                                       with_kwargs=True)
    try:
        sample_tokens(model, PROMPTS, SamplingPolicy(cfg_scale=3.0), None, 4, [1, 2, 3], 0, uncond_prompts=UNCOND)
        guided = list(batches)
        batches.clear()
        sample_tokens(model, PROMPTS, SamplingPolicy(cfg_scale=1.0), None, 4, [1, 2, 3], 0, uncond_prompts=UNCOND)
    finally:
        hook.remove()
    assert guided == [6] * 4  # one prefill + 3 steps, each over cond + uncond rows together
    assert batches == [3] * 4  # scale 1: the unconditional rows are not computed at all


def reference_conditional_sampling(model, prompt, allowed, steps, seed, temperature):
    """Plain conditional sampling: full forward at every step, no cache, no guidance, no batching."""
    gen, ids = torch.Generator().manual_seed(seed), list(prompt)
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[:, -1]
        logp = (logits / temperature).masked_fill(~allowed, float("-inf")).log_softmax(-1)
        ids.append(int(sample_from_logprobs(logp, [gen])))
    return ids[len(prompt):]


def test_cfg_scale_one_equals_conditional_sampling(model, vocab):
    allowed = vocab.visual_mask()
    policy = SamplingPolicy(cfg_scale=1.0, temperature=1.3)
    out = sample_tokens(model, PROMPTS, policy, allowed, vocab.K, [7, 8, 9], vocab.pad_id, uncond_prompts=UNCOND)
    for i, prompt in enumerate(PROMPTS):
        ref = reference_conditional_sampling(model, prompt, allowed, vocab.K, 7 + i, 1.3)
        assert out.token_ids[i].tolist() == ref
    guided = sample_tokens(model, PROMPTS, SamplingPolicy(cfg_scale=6.0, temperature=1.3), allowed, vocab.K,
                           [7, 8, 9], vocab.pad_id, uncond_prompts=UNCOND)
    assert not torch.equal(guided.token_ids, out.token_ids)  # guidance does change the samples


def test_masked_sampling_never_emits_a_non_visual_id(vocab, text_tokenizer):
    model = tiny_llama(vocab.model_vocab_size, seed=1)
    with torch.no_grad():  # make text ids (and <eoi>) far more likely than any visual id
        model.lm_head.weight[:vocab.visual_offset] *= 200
    captions = ["a red circle", "two blue square", ""] * 2
    seeds = list(range(6))
    for policy in (SamplingPolicy(cfg_scale=3.0, top_p=0.9), SamplingPolicy(cfg_scale=0.5, temperature=2.0)):
        out = generate_image_tokens(model, vocab, text_tokenizer, captions, policy, seeds, batch_size=4)
        span = out.token_ids[:, :vocab.K]
        assert vocab.is_visual(span).all()
        assert (out.token_ids[:, vocab.K] == vocab.eoi_id).all() and out.token_ids.shape[1] == vocab.K + 1
    unmasked = sample_tokens(model, t2i_prompt_ids(vocab, text_tokenizer, captions, 40), SamplingPolicy(
        vocabulary="all", cfg_scale=1.0), None, vocab.K, seeds, vocab.pad_id)
    assert not vocab.is_visual(unmasked.token_ids).all()  # without the mask this model emits text ids


def test_same_seed_same_image_alone_or_in_a_batch(model, vocab, text_tokenizer):
    captions = ["a red circle left of a blue square", "one triangle", "", "three green circle above the square"]
    seeds = [101, 202, 303, 404]
    policy = SamplingPolicy(cfg_scale=3.0, top_k=20, temperature=1.0)
    batch = generate_image_tokens(model, vocab, text_tokenizer, captions, policy, seeds, batch_size=4)
    for i in range(len(captions)):
        alone = generate_image_tokens(model, vocab, text_tokenizer, captions[i:i + 1], policy, seeds[i:i + 1])
        assert torch.equal(alone.token_ids[0], batch.token_ids[i])
        torch.testing.assert_close(alone.logprobs[0], batch.logprobs[i], atol=1e-4, rtol=0)
    other_seed = generate_image_tokens(model, vocab, text_tokenizer, captions[:1], policy, [999])
    assert not torch.equal(other_seed.token_ids[0], batch.token_ids[0])


def test_codes_are_flipped_back_to_encoder_order(model, vocab, text_tokenizer):
    out = generate_image_tokens(model, vocab, text_tokenizer, ["a red circle", "one square"], SamplingPolicy(),
                                [1, 2])
    ar_codes = out.token_ids[:, :vocab.K] - vocab.visual_offset  # v_1 (coarsest) first
    assert torch.equal(out.codes[:, -1], ar_codes[:, 0])  # v_1 is the encoder's last index (K-1)
    assert torch.equal(out.codes, ar_codes.flip(-1)) and not torch.equal(out.codes, ar_codes)


def test_score_tokens_reproduces_the_sampler_logprobs_and_has_gradients(vocab):
    """RL recomputes log-probs in one teacher-forced forward; they must equal what the sampler used."""
    model = tiny_llama(vocab.model_vocab_size, seed=2)
    allowed = vocab.visual_mask()
    policy = SamplingPolicy(cfg_scale=2.0, cfg_schedule="linear", cfg_scale_end=1.0, top_k=25, top_p=0.95,
                            temperature=0.9)
    out = sample_tokens(model, PROMPTS, policy, allowed, vocab.K, [4, 5, 6], vocab.pad_id, uncond_prompts=UNCOND)
    scored = score_tokens(model, PROMPTS, out.token_ids, policy, allowed, vocab.pad_id, uncond_prompts=UNCOND)
    torch.testing.assert_close(scored, out.logprobs, atol=1e-4, rtol=0)
    assert torch.isfinite(scored).all()
    scored.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_left_padding_positions():
    ids, mask = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[]], 0)


def test_prompts_empty_is_unconditional_and_long_is_truncated(vocab, text_tokenizer, caplog):
    rows = t2i_prompt_ids(vocab, text_tokenizer, ["", "   ", "a red circle"], max_tokens=5)
    assert rows[0] == rows[1] == vocab.uncond_prompt()
    assert rows[2] == [vocab.bos_id, 4 + WORDS.index("a"), 4 + WORDS.index("red"), 4 + WORDS.index("circle"),
                       vocab.boi_id]
    long = " ".join(["red"] * 12)
    with caplog.at_level(logging.WARNING, logger="vlm.sampler"):
        (row,) = t2i_prompt_ids(vocab, text_tokenizer, [long], max_tokens=5)
    assert len(row) == 7 and row[-1] == vocab.boi_id and "truncated" in caplog.text


def test_over_long_prompt_still_generates_within_the_context(vocab, text_tokenizer, caplog):
    model = tiny_llama(vocab.model_vocab_size, context=24)  # 24 - K(8) - 4 = 12 caption tokens at most
    with caplog.at_level(logging.WARNING, logger="vlm.sampler"):
        out = generate_image_tokens(model, vocab, text_tokenizer, [" ".join(["blue"] * 40)], SamplingPolicy(), [0])
    assert "truncated" in caplog.text and vocab.is_visual(out.token_ids[:, :vocab.K]).all()


def test_negative_prompt_is_the_unconditional_branch(model, vocab, text_tokenizer):
    captions, seeds = ["a red circle"], [5]
    plain = generate_image_tokens(model, vocab, text_tokenizer, captions, SamplingPolicy(cfg_scale=4.0), seeds)
    negative = generate_image_tokens(model, vocab, text_tokenizer, captions,
                                     SamplingPolicy(cfg_scale=4.0, negative_prompt="blue square"), seeds)
    assert not torch.equal(plain.logprobs, negative.logprobs)


def test_captions_use_text_ids_and_stop_at_eos(vocab, text_tokenizer):
    model = tiny_llama(vocab.model_vocab_size, seed=3)
    codes = torch.randint(0, vocab.codebook_size, (3, vocab.K), generator=torch.Generator().manual_seed(0))
    texts = generate_text(model, vocab, text_tokenizer, codes, max_new_tokens=6)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    allowed = vocab.text_mask()
    prompts = [vocab.i2t_prompt(c) for c in codes.flip(-1)]
    out = sample_tokens(model, prompts, SamplingPolicy.greedy_text(), allowed, 6, [0, 1, 2], vocab.pad_id,
                        stop_id=vocab.eos_id)
    assert allowed[out.token_ids[out.mask]].all()
    # greedy: every sampled id is the argmax of the masked logits
    for i, p in enumerate(prompts):
        row = out.token_ids[i][out.mask[i]].tolist()
        logits = model(input_ids=torch.tensor([p + row]), use_cache=False).logits[0, len(p) - 1:-1]
        greedy = policy_logprobs(logits, None, SamplingPolicy.greedy_text(), 0, 1, allowed).argmax(-1)
        assert greedy.tolist() == row
        words = [t for t in row if t != vocab.eos_id]
        assert texts[i] == text_tokenizer.decode(words, skip_special_tokens=True).strip()
    # rows stop right after their stop id (greedy decoding is deterministic, so the same ids come again)
    stop = int(out.token_ids[0, 0])
    stopped = sample_tokens(model, prompts, SamplingPolicy.greedy_text(), allowed, 6, [0, 1, 2], vocab.pad_id,
                            stop_id=stop)
    for i in range(3):
        row = out.token_ids[i].tolist()
        length = row.index(stop) + 1 if stop in row else 6
        assert stopped.mask[i].sum() == length and stopped.token_ids[i, :length].tolist() == row[:length]
        assert (stopped.token_ids[i, length:] == vocab.pad_id).all()
    with pytest.raises(ValueError, match="cfg_scale"):
        generate_text(model, vocab, text_tokenizer, codes, policy=SamplingPolicy(cfg_scale=2.0, vocabulary="text"))


# ---- decoding, the model + tokenizer pair, the command line ------------------------------------------


@pytest.fixture(scope="module")
def image_tokenizer():
    from selftok.model.presets import get_preset
    from selftok.model.tokenizer import SelftokTokenizer
    torch.manual_seed(0)
    tok = SelftokTokenizer(get_preset("tiny")).eval()  # K = 16, codebook 64, 32 px
    with torch.no_grad():  # AdaLN-Zero starts by ignoring the codes: give the zero-initialised weights values
        for p in tok.parameters():
            if p.is_floating_point() and not p.any():
                p.normal_(0, 0.5)
    return tok


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory, image_tokenizer):
    """A saved VLM folder (weights + text tokenizer + vocab.json) and a saved tokenizer folder that match."""
    root = tmp_path_factory.mktemp("pair")
    table = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>")
    vocab = Vocabulary.extend_tokenizer(text_tok, codebook_size=image_tokenizer.codebook_size, K=image_tokenizer.K,
                                        image_tokenizer_sha256=state_dict_sha256(image_tokenizer))
    model = tiny_llama(vocab.model_vocab_size, seed=5)
    model.save_pretrained(root / "vlm")
    text_tok.save_pretrained(root / "vlm")
    vocab.save(root / "vlm")
    image_tokenizer.save_pretrained(root / "tok")
    return root / "vlm", root / "tok"


def test_images_are_decoded_from_encoder_order(pair_dirs, image_tokenizer):
    """Would fail if the sampled (AR-order) codes reached the renderer unflipped."""
    from vlm.pipeline import load_pipeline
    from vlm.sampler import generate_images
    pipe = load_pipeline(*pair_dirs)
    tokens, images = generate_images(pipe.model, pipe.vocab, pipe.text_tokenizer, image_tokenizer,
                                     ["a red circle", "two blue square"], SamplingPolicy(), [3, 4])
    ar_codes = tokens.token_ids[:, :pipe.vocab.K] - pipe.vocab.visual_offset
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images, image_tokenizer.render(ar_codes.flip(-1)).clamp(0, 1))
    assert (images - image_tokenizer.render(ar_codes).clamp(0, 1)).abs().max() > 1e-3


def test_diffusion_decoding_uses_per_image_seeds(image_tokenizer):
    from vlm.sampler import decode_codes
    codes = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    batch = decode_codes(image_tokenizer, codes, "diffusion", steps=2, seeds=[7, 8, 9], batch_size=3)
    alone = decode_codes(image_tokenizer, codes[1:2], "diffusion", steps=2, seeds=[8])
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="decoder"):
        decode_codes(image_tokenizer, codes, "vae")


def test_a_mismatched_model_and_tokenizer_pair_is_refused(tmp_path, pair_dirs, vocab):
    from selftok.model.presets import get_preset
    from selftok.model.tokenizer import SelftokTokenizer
    from vlm.pipeline import check_pair, load_pipeline
    from vlm.vocab import VocabularyError
    other = get_preset("tiny")
    other.quantizer.codebook_size = 32
    SelftokTokenizer(other).save_pretrained(tmp_path / "tok32")
    with pytest.raises(VocabularyError, match="codebook_size: model 64, tokenizer 32"):
        load_pipeline(pair_dirs[0], tmp_path / "tok32")
    with pytest.raises(VocabularyError, match="K: model 8, tokenizer 16"):
        check_pair(vocab, SelftokTokenizer(get_preset("tiny")))
    # the same sizes, other weights (another training run): the codes would mean something else
    pipe = load_pipeline(*pair_dirs)
    torch.manual_seed(123)
    SelftokTokenizer(pipe.image_tokenizer.cfg).save_pretrained(tmp_path / "retrained")
    recorded = pipe.vocab.image_tokenizer_sha256
    with pytest.raises(VocabularyError, match=f"tokenizer with weights {recorded[:16]}.*retrained has "):
        load_pipeline(pair_dirs[0], tmp_path / "retrained")


def test_cli_t2i_writes_images_grid_and_settings(tmp_path, pair_dirs):
    from selftok.shapes import evaluate_folder
    from vlm.generate import main
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a photo of a red circle", "tag": "colors",
                                   "include": [{"class": "circle", "count": 1, "color": "red"}]}) + "\n"
                       + json.dumps({"prompt": ""}) + "\n")
    model_dir, tok_dir = map(str, pair_dirs)
    out = tmp_path / "out"
    assert main(["t2i", "--model", model_dir, "--tokenizer", tok_dir, "--prompts", str(prompts),
                   "--n-per-prompt", "2", "--out", str(out), "--cfg-scale", "2.5", "--top-k", "30",
                 "--batch-size", "3", "--dtype", "fp32"]) == 0
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [
        "00000_000.png", "00000_001.png", "00001_000.png", "00001_001.png"]
    assert (out / "grid.png").is_file()
    saved = json.loads((out / "generation.json").read_text())
    assert saved["sampling"] == {"cfg_scale": 2.5, "cfg_schedule": "constant", "cfg_scale_end": None,
                                 "negative_prompt": None, "temperature": 1.0, "top_k": 30, "top_p": 1.0,
                                 "vocabulary": "visual"}
    assert saved["model"].endswith("vlm") and saved["tokenizer"].endswith("tok") and saved["decoder"] == "renderer"
    assert len({im["seed"] for im in saved["images"]}) == 4 and saved["n_per_prompt"] == 2
    report = evaluate_folder(out / "images")  # the spec rides along: the output is directly scorable
    assert report["n_images"] == 4 and report["per_category"].keys() >= {"colors"}
    # same prompt + seed alone reproduces the image written in the batch
    main(["t2i", "--model", model_dir, "--tokenizer", tok_dir, "--prompt", "a photo of a red circle",
          "--n-per-prompt", "1", "--out", str(tmp_path / "one"), "--cfg-scale", "2.5", "--top-k", "30",
          "--batch-size", "1", "--dtype", "fp32"])
    import numpy as np
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one/images/00000_000.png")),
                          np.asarray(Image.open(out / "images/00000_000.png")))


@pytest.mark.parametrize("flag, value, setting", [("--top-p", "1.5", "top_p"), ("--cfg-scale", "-1", "cfg_scale"),
                                                  ("--temperature", "0", "temperature")])
def test_cli_rejects_bad_settings_naming_them(pair_dirs, tmp_path, capsys, flag, value, setting):
    from vlm.generate import main
    with pytest.raises(SystemExit) as e:
        main(["t2i", "--model", str(pair_dirs[0]), "--tokenizer", str(pair_dirs[1]), "--prompt", "a circle",
              "--out", str(tmp_path), flag, value])
    assert e.value.code == 2 and setting in capsys.readouterr().err


@pytest.mark.parametrize("policy", [SamplingPolicy(cfg_scale=2.0, temperature=0.7),
                                    SamplingPolicy(cfg_scale=4.0, cfg_schedule="linear", cfg_scale_end=1.5, top_k=20,
                                                   top_p=0.9, negative_prompt="a square", vocabulary="all")])
def test_policy_args_give_back_the_policy(policy):
    from vlm.generate import build_parser, check_settings, policy_args
    args = build_parser().parse_args(["t2i", "--model", "m", "--tokenizer", "t", "--prompt", "p", "--out", "o",
                                      *policy_args(policy)])
    assert check_settings(args) == policy


def test_cli_caption_folder(tmp_path, pair_dirs):
    from selftok.shapes import export_split
    from vlm.generate import main
    export_split(tmp_path / "imgs", "heldout", n=3, size=32)
    out = tmp_path / "captions.json"
    main(["caption", "--model", str(pair_dirs[0]), "--tokenizer", str(pair_dirs[1]), "--images",
          str(tmp_path / "imgs"), "--out", str(out), "--max-new-tokens", "5"])
    saved = json.loads(out.read_text())
    assert [c["file_name"] for c in saved["captions"]] == ["0000000.png", "0000001.png", "0000002.png"]
    assert saved["sampling"]["vocabulary"] == "text" and saved["sampling"]["top_k"] == 1
    assert all(isinstance(c["text"], str) for c in saved["captions"])


def test_caption_verdict_judges_truth_against_the_scene():
    from selftok.shapes import make_example
    from vlm.evaluation import caption_verdict
    ex = make_example("heldout", 3, size=32)
    assert caption_verdict(ex.caption, ex) == {"correct": True, "exact_match": True}
    assert caption_verdict("a photo of four diamonds and", ex)["correct"] is False
    wrong_shape = "a photo of a circle" if "circle" not in ex.caption else "a photo of a square"
    assert caption_verdict(wrong_shape, ex)["correct"] is False


def test_cli_evaluate_scores_heldout_prompts_and_captions(tmp_path, pair_dirs):
    from selftok.shapes import heldout_prompts
    from vlm.generate import main
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(pair_dirs[0]), "--tokenizer", str(pair_dirs[1]), "--out", str(out),
                 "--n-captions", "6", "--batch-size", "32", "--max-new-tokens", "4", "--seed", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    n = len(heldout_prompts())
    assert summary["t2i"]["n_images"] == n and len(list((out / "images").glob("*.png"))) == n
    assert set(summary["t2i"]["per_category"]) == {"single_object", "two_object", "counting", "colors", "position",
                                                   "color_attr"}
    assert 0 <= summary["t2i"]["overall"] <= 1
    captions = json.loads((out / "captions.json").read_text())
    assert captions["n"] == 6 and len(captions["captions"]) == 6 and 0 <= captions["accuracy"] <= 1
    assert [c["id"] for c in captions["captions"]] == [f"heldout-1-{i:07d}" for i in range(6)]  # --seed's scenes
    assert summary["captions"]["n"] == 6
    kinds = {c["heldout"] for c in captions["captions"]}  # scenes 0-5 cycle through the six categories
    assert "none" in kinds and {"pair", "count"} <= {k for c in kinds for k in c.split("+")}
    assert set(summary["captions"]["per_heldout_kind"]) == kinds
    seen = json.loads((out / "captions_seen.json").read_text())  # new images of training compositions
    assert [c["id"] for c in seen["captions"]] == [f"train-1001-{i:07d}" for i in range(6)]
    assert summary["captions_seen"]["n"] == 6 and 0 <= summary["captions_seen"]["accuracy"] <= 1


def test_cli_rejects_a_policy_that_does_not_fit_the_verb(pair_dirs, tmp_path, capsys):
    from vlm.generate import main
    common = ["--model", str(pair_dirs[0]), "--tokenizer", str(pair_dirs[1]), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        main(["t2i", *common, "--prompt", "a circle", "--vocabulary", "text"])
    assert "vocabulary" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["caption", *common, "--images", str(tmp_path), "--cfg-scale", "2"])
    assert "cfg-scale" in capsys.readouterr().err


def test_questions_are_appended_and_truncated_to_the_context(vocab, text_tokenizer, caplog):
    model = tiny_llama(vocab.model_vocab_size, seed=3, context=8 + 3 + 4 + 2)  # room for 2 question ids
    codes = torch.randint(0, vocab.codebook_size, (2, vocab.K), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="vlm.sampler"):
        texts = generate_text(model, vocab, text_tokenizer, codes, questions=["red", "the red circle above"],
                              max_new_tokens=4)
    assert len(texts) == 2 and "question of 4 tokens truncated to 2" in caplog.text
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_text(model, vocab, text_tokenizer, codes, max_new_tokens=10)
