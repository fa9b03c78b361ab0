"""The VLM: any Hugging Face causal LM whose vocabulary is extended with the visual codes.

`build_model(cfg, vocab)` loads `AutoModelForCausalLM` from a local path (or builds a Llama from
`cfg.llama`), resizes the embedding and output matrices to `vocab.model_vocab_size` (a multiple of 64) with the
new rows set to the mean of the base text rows, and applies a training mode:

- ``full``: every parameter trains;
- ``new_rows``: only the new rows of the input embedding and of the output layer train (the alignment stage),
  as `peft` trainable-token deltas; every base weight stays bit-identical;
- ``lora``: LoRA adapters on the linear layers plus the same trainable new rows in both ``embed_tokens`` and
  ``lm_head`` (training only the input rows barely moves the visual-token loss).

`export_model(model)` merges any adapter so the result saves with `save_pretrained` and loads back with plain
`AutoModelForCausalLM.from_pretrained`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from vlm.vocab import Vocabulary

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LlamaSpec:
    """Shape of a Llama built from scratch (used when `ModelConfig.base_model` is None)."""

    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 8
    intermediate_size: int = 704
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}, "
                             f"which must divide by num_kv_heads {self.num_kv_heads}")


@dataclasses.dataclass
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Linear layers that get adapters (module-name suffixes)."""


@dataclasses.dataclass
class ModelConfig:
    base_model: str | None = None
    """Local folder with a HF causal LM (weights + tokenizer). None: build a Llama from `llama` and use the
    text tokenizer named in the run config."""
    llama: LlamaSpec = dataclasses.field(default_factory=LlamaSpec)
    mode: Literal["full", "new_rows", "lora"] = "full"
    lora: LoraSpec = dataclasses.field(default_factory=LoraSpec)
    new_rows_init: Literal["mean", "normal"] = "mean"
    """New rows = mean of the base text rows ("mean"), or drawn like a fresh layer ("normal", std
    `llama.initializer_range`; useful only for models trained from scratch)."""
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    """transformers attention: "sdpa" (GPUs) or "eager". On CPUs torch's flash-attention backward is slow for
    short rows: the shapes VLM trains 1.6x faster with "eager" (docs/vlm.md)."""


def build_model(cfg: ModelConfig, vocab: Vocabulary) -> PreTrainedModel | PeftModel:
    """Base model (local path or config) -> extended vocabulary -> training mode."""
    model = load_base_model(cfg, vocab)
    extend_model_vocab(model, vocab, init=cfg.new_rows_init, std=cfg.llama.initializer_range)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return apply_training_mode(model, cfg, vocab)


def load_base_model(cfg: ModelConfig, vocab: Vocabulary) -> PreTrainedModel:
    """The base LM in fp32 (mixed precision is the trainer's job), with text-sized embeddings."""
    if cfg.base_model is not None:
        return AutoModelForCausalLM.from_pretrained(cfg.base_model, local_files_only=True, dtype=torch.float32,
                                                    attn_implementation=cfg.attn_implementation)
    s = cfg.llama
    config = LlamaConfig(
        vocab_size=vocab.visual_offset, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        max_position_embeddings=s.max_position_embeddings, rope_theta=s.rope_theta,
        tie_word_embeddings=s.tie_word_embeddings, initializer_range=s.initializer_range,
        bos_token_id=vocab.bos_id, eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id)
    config._attn_implementation = cfg.attn_implementation
    return LlamaForCausalLM(config)


@torch.no_grad()
def extend_model_vocab(model: PreTrainedModel, vocab: Vocabulary, init: str = "mean", std: float = 0.02) -> None:
    """Resize embeddings/output to `vocab.model_vocab_size`; set every new row; leave base text rows untouched."""
    rows = model.get_input_embeddings().weight.shape[0]
    if rows > vocab.model_vocab_size:
        raise ValueError(f"the base model has {rows} embedding rows, more than the extended vocabulary's "
                         f"{vocab.model_vocab_size}; visual ids would collide with existing rows")
    if rows < vocab.visual_offset:
        raise ValueError(f"the base model has {rows} embedding rows but its tokenizer (with specials) needs "
                         f"{vocab.visual_offset}; is the tokenizer from another model?")
    model.resize_token_embeddings(vocab.model_vocab_size, mean_resizing=False)
    new = torch.tensor(vocab.new_ids)
    base = torch.tensor(vocab.base_text_ids)
    matrices = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not matrices[0]:
        matrices.append(out.weight)
    for w in matrices:
        if init == "mean":
            w[new] = w[base].float().mean(0).to(w.dtype)
        else:
            w[new] = (torch.randn(len(new), w.shape[1]) * std).to(w.dtype)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(vocab, name.replace("_token", "")))
    if getattr(model, "generation_config", None) is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.generation_config, name, getattr(vocab, name.replace("_token", "")))


def embedding_module_names(model: PreTrainedModel) -> list[str]:
    """Module names of the input embedding and (if untied) the output layer, e.g. ["embed_tokens", "lm_head"]."""
    targets = [model.get_input_embeddings()]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not targets[0].weight:
        targets.append(out)
    names = [next(n for n, m in model.named_modules() if m is t).split(".")[-1] for t in targets]
    return names


def apply_training_mode(model: PreTrainedModel, cfg: ModelConfig, vocab: Vocabulary) -> PreTrainedModel | PeftModel:
    if cfg.mode == "full":
        return model
    rows = {name: vocab.new_ids for name in embedding_module_names(model)}
    if cfg.mode == "new_rows":
        peft_cfg = TrainableTokensConfig(target_modules=list(rows), token_indices=vocab.new_ids)
    else:
        peft_cfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                              target_modules=list(cfg.lora.target_modules), trainable_token_indices=rows)
    model = get_peft_model(model, peft_cfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("training mode %s: %.2f M of %.2f M parameters trainable", cfg.mode, n_train / 1e6, n_all / 1e6)
    return model


def export_model(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """A plain HF model for `save_pretrained`: adapters and trainable-token deltas merged into the weights."""
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.config.use_cache = True
    return model


def count_matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls per token (all but the input embedding lookup): the N of 6·N·tokens."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    n = sum(p.numel() for p in model.parameters() if p is not emb)
    return n + emb.numel() if out is not None and out.weight is emb else n
