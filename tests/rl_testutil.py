"""Helpers for the RL tests and benchmark: a tiny random VLM folder and a tiny Selftok tokenizer with a renderer,
saved the way `vlm.train` and `SelftokTokenizer.save_pretrained` save real ones."""
from __future__ import annotations

from pathlib import Path

import torch

from selftok.model.presets import get_preset
from selftok.model.tokenizer import SelftokTokenizer
from selftok.shapes import CATEGORIES, all_specs, caption_variants
from vlm.model import LlamaSpec, ModelConfig, build_model, export_model
from vlm.text_tokenizer import train_text_tokenizer
from vlm.vocab import Vocabulary

TINY_LLAMA = LlamaSpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                       max_position_embeddings=64)


def shapes_captions() -> list[str]:
    return [c for tag in CATEGORIES for s in all_specs(tag) for c in caption_variants(s)]


def make_artifacts(root: Path, preset: str = "tiny", llama: LlamaSpec = TINY_LLAMA, seed: int = 0,
                   decoder: bool = False) -> tuple[Path, Path]:
    """(vlm folder, tokenizer folder) with random weights under `root`."""
    torch.manual_seed(seed)
    tok_cfg = get_preset(preset)
    if not decoder:
        tok_cfg.decoder = None
    image_tok = SelftokTokenizer(tok_cfg)
    with torch.no_grad():  # DiT-style zero-initialised modulations make a fresh renderer ignore its codes
        for p in image_tok.renderer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        pos = image_tok.renderer.positional_embedding  # the official random table, not the training init's
        pos.copy_(torch.randn_like(pos) * pos.shape[1] ** -0.5)  # sin-cos: images depend more on the codes
    tok_dir = root / "tokenizer"
    image_tok.save_pretrained(tok_dir)
    vlm_dir = root / "vlm"
    text_tok = train_text_tokenizer(shapes_captions(), root / "text_tokenizer", vocab_size=400)
    vocab = Vocabulary.extend_tokenizer(text_tok, codebook_size=tok_cfg.quantizer.codebook_size, K=tok_cfg.schedule.K)
    model = build_model(ModelConfig(llama=llama, new_rows_init="normal"), vocab)
    export_model(model).save_pretrained(vlm_dir)
    text_tok.save_pretrained(vlm_dir)
    vocab.save(vlm_dir)
    return vlm_dir, tok_dir


def tiny_overrides(vlm_dir: Path, tok_dir: Path, out: Path) -> list[str]:
    """Overrides for a seconds-long CPU run on the tiny artifacts."""
    return [f"run.out_dir={out}", f"policy.vlm_path={vlm_dir}", f"policy.tokenizer_path={tok_dir}",
            "rollout.batch_size=8", "rollout.group_size=4", "rollout.sampling.cfg_scale=2.0",
            "update.micro_batch_size=4", "update.lr=1e-3", "update.max_steps=3", "eval.every=0",
            "eval.grid_prompts=4", "prompts.max_heldout=12", "run.checkpoint_every=1"]


def make_clip(directory: Path) -> Path:
    """A tiny random CLIP (character-level tokenizer, 32-px images) saved with its processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    torch.manual_seed(0)
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    CLIPModel(cfg).save_pretrained(directory)
    proc.save_pretrained(directory)
    return directory


VQA_WORDS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "Yes", "No", "yes", "no", "USER:", "ASSISTANT:", "Is",
             "Are", "there", "a", "an", "the", "red", "blue", "circle", "squares", "triangle", "exactly", "two", "?",
             "Answer", "or", "."]


def make_llava(directory: Path) -> Path:
    """A tiny random LLaVA (word-level tokenizer of `VQA_WORDS`, a chat template) saved with its processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VQA_WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.add_tokens(["<image>"], special_tokens=True)
    template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1, chat_template=template)
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=32, patch_size=8),
                      text_config=LlamaConfig(vocab_size=len(VQA_WORDS), hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2),
                      image_token_id=4, vision_feature_select_strategy="default")
    LlavaForConditionalGeneration(cfg).save_pretrained(directory)
    proc.save_pretrained(directory)
    return directory
