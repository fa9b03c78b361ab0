"""The playground's page (Gradio) and what its buttons run; the work itself is `vlm.generate`'s.

Text → image runs exactly what ``python -m vlm.generate t2i`` runs (same settings checks, seeds, sampler,
writer and JSON record) with the VLM wrapped in a `PreviewTap` for the coarse-to-fine previews. Every
handler turns an exception into a message in the page (`gr.Error`); the server keeps serving.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import logging
import queue
import shlex
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from selftok.reconstruct import decoders_to_run, load_image
from selftok.runtime.grid import image_grid, pil_to_tensor, to_pil_images
from selftok.shapes import make_example
from selftok.training import metrics
from vlm.evaluation import caption_verdict
from vlm.generate import autocast, build_parser, check_settings, settings_record
from vlm.pipeline import Pipeline, load_pipeline, save_t2i, t2i_seeds
from vlm.sampler import (
    decode_codes,
    generate_images,
    generate_text,
    max_prompt_tokens,
    t2i_prompt_ids,
    uncond_prompt_ids,
)
from vlm.playground.previews import PreviewTap, complete_greedily
from vlm.sampling import SamplingPolicy
from vlm.vocab import ar_to_encoder_order

log = logging.getLogger(__name__)
ONE_AT_A_TIME = {"concurrency_id": "model", "concurrency_limit": 1}  # every model call shares one queue
MAX_IMAGES = 16  # one sampler batch (the CLI's default --batch-size): previews follow a single batch
PREVIEW_NOTE = ("**Preview after {n}/{K} tokens**: the {n} sampled tokens, the other {rest} filled in "
                "greedily (most likely token, same prompt and guidance), rendered by the one-step renderer "
                "— an estimate of where sampling is heading, not the final image.")


@dataclasses.dataclass
class ServerSettings:
    """How the server runs the models (the `vlm.generate` options of the same names)."""
    device: str = "cpu"
    dtype: str = "bf16"
    vae: str | None = None
    attn: str | None = None
    out: str | None = None  # where each generation's folder goes (default: a temporary folder)


def page_errors(fn: Callable) -> Callable:
    """Show any exception of a handler as a message in the page; log its traceback on the server."""
    def message(e: Exception) -> gr.Error:
        if isinstance(e, gr.Error):
            return e
        log.exception("playground handler %s failed", fn.__name__)
        plain = isinstance(e, (ValueError, FileNotFoundError))  # their messages say what is wrong
        return gr.Error(str(e) if plain else f"{type(e).__name__}: {e}")

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args: Any) -> Iterator:
            try:
                yield from fn(*args)
            except Exception as e:  # noqa: BLE001 - any failure becomes a message in the page
                raise message(e) from None
        return stream

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - any failure becomes a message in the page
            raise message(e) from None
    return call


def checked_image(path: str | None) -> str:
    """The uploaded file's path, if PIL can read it as an image; else a message naming the file."""
    if not path:
        raise gr.Error("upload an image first")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError):
        raise gr.Error(f"{Path(path).name} is not an image (upload a PNG, JPEG, WebP or BMP file)") from None
    return path


def enlarge(image: Image.Image, side: int = 256) -> Image.Image:
    """Scale a small image up by a whole factor (nearest neighbour) so the page shows its pixels."""
    factor = max(1, side // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def number(value: float | None, name: str) -> float:
    if value is None:
        raise gr.Error(f"{name}: enter a number")
    return value


def reproduce_command(args: argparse.Namespace) -> str:
    """The ``python -m vlm.generate t2i`` command line with exactly these settings."""
    argv = ["python", "-m", "vlm.generate", args.verb]
    for dest, value in vars(args).items():
        if dest != "verb" and value is not None:
            argv += ["--" + dest.replace("_", "-"), str(value)]
    return shlex.join(argv)


class Playground:
    """The loaded model pair and the page's handlers (one model call at a time: `ONE_AT_A_TIME`)."""

    def __init__(self, model_dir: str | Path, tokenizer_dir: str | Path,
                 settings: ServerSettings | None = None):
        self.settings = settings or ServerSettings()
        self.out = Path(self.settings.out or tempfile.mkdtemp(prefix="vlm-playground-"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.pipe = self._load(model_dir, tokenizer_dir)

    def _load(self, model_dir: str | Path, tokenizer_dir: str | Path) -> Pipeline:
        s = self.settings
        return load_pipeline(model_dir, tokenizer_dir, s.device, s.vae, s.attn)

    @property
    def K(self) -> int:
        return self.pipe.vocab.K

    def describe(self) -> str:
        tok = self.pipe.image_tokenizer
        return (f"model `{self.pipe.model_dir}` · tokenizer `{self.pipe.tokenizer_dir}` · "
                f"K = {self.K} tokens, codebook {tok.codebook_size}, {tok.cfg.image_size} px · "
                f"{self.settings.device}, {self.settings.dtype}")

    @page_errors
    def load(self, model_dir: str, tokenizer_dir: str) -> str:
        """Switch to another model pair; a pair that disagrees is refused and the current one kept."""
        self.pipe = self._load(model_dir.strip(), tokenizer_dir.strip())
        return "Loaded: " + self.describe()

    # ---- text → image ------------------------------------------------------------------------------------

    def t2i_args(self, prompt: str, n: float | None, seed: float | None, cfg_scale: float | None,
                 cfg_schedule: str, cfg_scale_end: float | None, negative_prompt: str,
                 temperature: float | None, top_k: float | None, top_p: float | None, decoder: str,
                 steps: float | None) -> argparse.Namespace:
        """The page's settings as the `vlm.generate t2i` arguments (its defaults for what the page lacks)."""
        s = self.settings
        args = build_parser().parse_args(["t2i", "--model", self.pipe.model_dir, "--tokenizer",
                                          self.pipe.tokenizer_dir, "--out", "", f"--prompt={prompt or ''}"])
        fields = {"n_per_prompt": number(n, "images"), "seed": number(seed, "seed"),
                  "cfg_scale": number(cfg_scale, "cfg scale"),
                  "temperature": number(temperature, "temperature"),
                  "top_k": number(top_k, "top-k"), "top_p": number(top_p, "top-p"),
                  "steps": number(steps, "steps")}
        vars(args).update({k: int(v) if k in ("n_per_prompt", "seed", "top_k", "steps") else float(v)
                           for k, v in fields.items()})
        end = None if cfg_schedule == "constant" else cfg_scale_end  # unused by constant: the CLI default
        vars(args).update(cfg_schedule=cfg_schedule, cfg_scale_end=end, decoder=decoder,
                          negative_prompt=negative_prompt or None, device=s.device, dtype=s.dtype, vae=s.vae,
                          attn=s.attn)
        return args

    def preview_images(self, pipe: Pipeline, captions: list[str], policy: SamplingPolicy) -> Callable:
        """prefix (B, n) → (B, 3, H, W) previews (see `vlm.playground.previews`)."""
        limit = max_prompt_tokens(pipe.model, pipe.vocab)
        prompts = t2i_prompt_ids(pipe.vocab, pipe.text_tokenizer, captions, limit)
        uncond = uncond_prompt_ids(pipe.vocab, pipe.text_tokenizer, policy, len(captions), limit)

        def render(prefix: Tensor) -> Tensor:
            ids = complete_greedily(pipe.model, pipe.vocab, prompts, uncond, prefix, policy)
            return decode_codes(pipe.image_tokenizer, ar_to_encoder_order(pipe.vocab.ids_to_codes(ids)))
        return render

    def _sample(self, pipe: Pipeline, args: argparse.Namespace, policy: SamplingPolicy, captions: list[str],
                seeds: list[int], every: int, events: queue.Queue) -> None:
        """The worker thread: sample (reporting previews), decode; the outcome goes to `events`."""
        try:
            with autocast(args.device, args.dtype):
                render = self.preview_images(pipe, captions, policy)
                tap = PreviewTap(pipe.model, policy.guided, every,
                                 lambda prefix: events.put(("preview", (prefix.shape[1], render(prefix)))))
                result = generate_images(tap, pipe.vocab, pipe.text_tokenizer, pipe.image_tokenizer, captions,
                                         policy, seeds, args.decoder, args.steps, args.batch_size)
            events.put(("done", result))
        except Exception as e:  # noqa: BLE001 - handed to the page's thread, which shows it
            events.put(("error", e))

    @page_errors
    def t2i(self, prompt: str, n: float | None, seed: float | None, cfg_scale: float | None,
            cfg_schedule: str, cfg_scale_end: float | None, negative_prompt: str, temperature: float | None,
            top_k: float | None, top_p: float | None, decoder: str, steps: float | None,
            every: float | None) -> Iterator[tuple]:
        """Yields (preview, preview note, images, record, record file, command, token ids, status)."""
        args = self.t2i_args(prompt, n, seed, cfg_scale, cfg_schedule, cfg_scale_end, negative_prompt,
                             temperature, top_k, top_p, decoder, steps)
        policy = check_settings(args)
        if args.n_per_prompt > MAX_IMAGES:
            raise gr.Error(f"images: at most {MAX_IMAGES} at a time, got {args.n_per_prompt}")
        every = int(number(every, "preview every"))
        if every < 0:
            raise gr.Error(f"preview every: 0 (no previews) or a number of tokens, got {every}")
        pipe, rows = self.pipe, [{"prompt": args.prompt}]
        every = every if pipe.image_tokenizer.renderer is not None else 0
        args.out = tempfile.mkdtemp(prefix="t2i-", dir=self.out)
        seeds = t2i_seeds(rows, args.n_per_prompt, args.seed)
        events: queue.Queue = queue.Queue()
        start, first = time.perf_counter(), None
        what = "unconditional (empty prompt)" if not args.prompt.strip() else f"“{args.prompt}”"
        skip = [gr.skip()] * 6
        started = f"sampling {args.n_per_prompt} × {self.K} tokens for {what} …"
        yield None, started, [], None, None, "", None, ""
        captions = [args.prompt] * args.n_per_prompt
        threading.Thread(target=self._sample, daemon=True,
                         args=(pipe, args, policy, captions, seeds, every, events)).start()
        while True:
            kind, value = events.get()
            if kind == "error":
                raise value
            if kind == "done":
                break
            first = first or time.perf_counter() - start
            n_tok, images = value
            note = PREVIEW_NOTE.format(n=n_tok, K=self.K, rest=self.K - n_tok)
            yield (enlarge(image_grid(to_pil_images(images)), 512), note, *skip)
        tokens, images = value
        record = save_t2i(Path(args.out), rows, args.n_per_prompt, seeds, tokens, images,
                          settings_record(args, pipe, policy))
        total = time.perf_counter() - start
        files = sorted((Path(args.out) / "images").glob("*.png"))
        gallery = [(str(f), f"seed {s}") for f, s in zip(files, seeds)]
        ids = {"token_ids": pipe.vocab.ids_to_codes(tokens.token_ids[:, :self.K]).tolist()}
        status = (f"{len(files)} images of {self.K} tokens in {total:.2f} s"
                  + (f" · first preview after {first:.2f} s" if first is not None else " · no previews")
                  + f" · written to `{args.out}`")
        log.info("t2i %r: %s", args.prompt, status)
        yield (gr.skip(), gr.skip(), gallery, record, str(Path(args.out) / "generation.json"),
               reproduce_command(args), ids, status)

    # ---- image → text ------------------------------------------------------------------------------------

    @page_errors
    def i2t(self, source: str, scene: float | None, upload: str | None, question: str,
            max_new_tokens: float | None) -> tuple[Image.Image, str, dict | None]:
        """Caption the image (or answer `question`); the shapes evaluator's verdict for a held-out scene."""
        pipe, size = self.pipe, self.pipe.image_tokenizer.cfg.image_size
        example, question = None, question or ""
        if source == "upload":
            with Image.open(checked_image(upload)) as im:
                image = im.convert("RGB")
        else:
            index = int(number(scene, "held-out scene"))
            if index < 0:
                raise gr.Error(f"held-out scene: an index >= 0, got {index}")
            example = make_example("heldout", index, size=size)
            image = example.image
        limit = int(number(max_new_tokens, "max new tokens"))
        if limit < 1:
            raise gr.Error(f"max new tokens must be >= 1, got {limit}")
        codes = pipe.image_tokenizer.encode(pil_to_tensor([image], size).to(_device(pipe.image_tokenizer)))
        with autocast(self.settings.device, self.settings.dtype):
            text = generate_text(pipe.model, pipe.vocab, pipe.text_tokenizer, codes.to(_device(pipe.model)),
                                 questions=[question] if question.strip() else None, max_new_tokens=limit)[0]
        verdict = None
        if example is not None:
            verdict = {"scene": example.id, "true caption": example.caption}
            verdict.update(caption_verdict(text, example) if not question.strip()
                           else {"note": "the evaluator judges captions: clear the question for a verdict"})
        return enlarge(image), text, verdict

    # ---- reconstruct -------------------------------------------------------------------------------------

    def prefix_lengths(self) -> list[int]:
        return sorted({max(1, self.K * f // 8) for f in (1, 2, 4, 6)})

    @page_errors
    def reconstruct(self, upload: str | None, steps: float | None,
                    seed: float | None) -> tuple[Image.Image, str, list, dict]:
        """Image → its K tokens (AR order) → renderer / diffusion reconstructions, and from prefixes."""
        pipe = self.pipe
        tok, size = pipe.image_tokenizer, pipe.image_tokenizer.cfg.image_size
        x = load_image(Path(checked_image(upload)), size)[None].to(_device(tok))
        steps, seed = int(number(steps, "steps")), int(number(seed, "seed"))
        if steps < 1:
            raise gr.Error(f"steps must be >= 1, got {steps}")
        codes = tok.encode(x)  # encoder order
        ar = ar_to_encoder_order(codes)  # AR order (the flip is its own inverse)
        gallery, psnr = [], {}
        for name in decoders_to_run(tok, "auto"):
            image = decode_codes(tok, codes, name, steps, [seed])
            value = round(float(metrics.psnr(image.cpu(), x.cpu())[0]), 2)
            psnr[f"{name}, all {self.K} tokens"] = value
            gallery.append((to_pil_images(image)[0], f"{name}: {value:.2f} dB"))
        if tok.renderer is not None:
            policy = SamplingPolicy(cfg_scale=1.0)  # no caption: the unconditional prompt
            prompt = [pipe.vocab.uncond_prompt()]
            for k in self.prefix_lengths():
                with autocast(self.settings.device, self.settings.dtype):
                    prefix = pipe.vocab.codes_to_ids(ar[:, :k]).to(_device(pipe.model))
                    ids = complete_greedily(pipe.model, pipe.vocab, prompt, prompt, prefix, policy)
                image = decode_codes(tok, ar_to_encoder_order(pipe.vocab.ids_to_codes(ids)).to(_device(tok)))
                value = round(float(metrics.psnr(image.cpu(), x.cpu())[0]), 2)
                psnr[f"renderer, first {k} tokens + greedy completion"] = value
                gallery.append((to_pil_images(image)[0], f"first {k}/{self.K} + greedy: {value:.2f} dB"))
        return enlarge(to_pil_images(x)[0]), " ".join(map(str, ar[0].tolist())), gallery, psnr


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def build_app(pg: Playground) -> gr.Blocks:
    """The page: a model panel and three tabs."""
    d = build_parser().parse_args(["t2i", "--model", "", "--tokenizer", "", "--out", "", "--prompt", ""])
    with gr.Blocks(title="Selftok playground") as app:
        gr.Markdown("# Selftok playground\nImages as sequences of discrete tokens, coarse content first.")
        with gr.Accordion("Model", open=False):
            model_status = gr.Markdown("Loaded: " + pg.describe(), elem_id="model-status")
            with gr.Row():
                model_dir = gr.Textbox(pg.pipe.model_dir, label="VLM folder")
                tok_dir = gr.Textbox(pg.pipe.tokenizer_dir, label="Selftok tokenizer folder")
            gr.Button("Load").click(pg.load, [model_dir, tok_dir], model_status, **ONE_AT_A_TIME)
        with gr.Tab("Text → image"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt (empty: unconditional)", elem_id="t2i-prompt",
                                        placeholder="a photo of a red circle")
                    with gr.Row():
                        n = gr.Number(d.n_per_prompt, label=f"Images (1–{MAX_IMAGES})", precision=0)
                        seed = gr.Number(d.seed, label="Seed", precision=0)
                    with gr.Accordion("Sampling policy (as `vlm.generate t2i`)", open=True):
                        with gr.Row():
                            cfg_scale = gr.Number(d.cfg_scale, label="CFG scale")
                            cfg_schedule = gr.Dropdown(["constant", "linear", "cosine"], value=d.cfg_schedule,
                                                       label="CFG schedule")
                            cfg_end = gr.Number(1.0, label="CFG scale at the last token (linear / cosine)")
                        negative = gr.Textbox(label="Negative prompt (empty: the <uncond> token)")
                        with gr.Row():
                            temperature = gr.Number(d.temperature, label="Temperature")
                            top_k = gr.Number(d.top_k, label="Top-k (0: off)", precision=0)
                            top_p = gr.Number(d.top_p, label="Top-p")
                        with gr.Row():
                            decoder = gr.Radio(["renderer", "diffusion"], value=d.decoder, label="Decoder")
                            steps = gr.Number(d.steps, label="Diffusion steps", precision=0)
                            every = gr.Number(max(1, pg.K // 4), label="Preview every … tokens (0: off)",
                                              precision=0)
                    run = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                with gr.Column(scale=1):
                    preview = gr.Image(label="Coarse-to-fine preview", elem_id="t2i-preview", height=256)
                    preview_note = gr.Markdown(elem_id="t2i-preview-note")
                    gallery = gr.Gallery(label="Images", elem_id="t2i-gallery", columns=4, height="auto")
                    status = gr.Markdown(elem_id="t2i-status")
                    command = gr.Textbox(label="The same generation from the command line",
                                         elem_id="t2i-command")
                    record_file = gr.File(label="generation.json (the record vlm.generate t2i writes)")
                    with gr.Accordion("Settings record and token ids", open=False):
                        record = gr.JSON(label="generation.json")
                        ids = gr.JSON(label="Visual token ids per image (AR order, codebook indices)")
            inputs = [prompt, n, seed, cfg_scale, cfg_schedule, cfg_end, negative, temperature, top_k, top_p,
                      decoder, steps, every]
            outputs = [preview, preview_note, gallery, record, record_file, command, ids, status]
            run.click(pg.t2i, inputs, outputs, api_name="t2i", **ONE_AT_A_TIME)
            prompt.submit(pg.t2i, inputs, outputs, api_visibility="private", **ONE_AT_A_TIME)
        with gr.Tab("Image → text"):
            with gr.Row():
                with gr.Column():
                    source = gr.Radio(["held-out shapes scene", "upload"], value="held-out shapes scene",
                                      label="Image")
                    scene = gr.Number(0, label="Held-out scene index", precision=0)
                    upload = gr.File(label="Upload an image", file_types=["image"], elem_id="i2t-upload")
                    question = gr.Textbox(label="Question (empty: caption the image)")
                    max_new = gr.Number(32, label="Max new tokens", precision=0)
                    ask = gr.Button("Caption / answer", variant="primary", elem_id="i2t-run")
                with gr.Column():
                    shown = gr.Image(label="Image", height=256)
                    answer = gr.Textbox(label="Caption / answer", elem_id="i2t-answer")
                    verdict = gr.JSON(label="Shapes evaluator's verdict")
            upload.upload(lambda: "upload", None, source, api_visibility="private")
            ask.click(pg.i2t, [source, scene, upload, question, max_new], [shown, answer, verdict],
                      api_name="i2t", **ONE_AT_A_TIME)
        with gr.Tab("Reconstruct"):
            with gr.Row():
                with gr.Column():
                    image_file = gr.File(label="Upload an image", file_types=["image"], elem_id="rec-upload")
                    with gr.Row():
                        rec_steps = gr.Number(d.steps, label="Diffusion decoder steps", precision=0)
                        rec_seed = gr.Number(0, label="Seed (decoder noise)", precision=0)
                    go = gr.Button("Tokenize and reconstruct", variant="primary", elem_id="rec-run")
                with gr.Column():
                    original = gr.Image(label="Input (as the tokenizer sees it)", height=256)
                    token_text = gr.Textbox(label=f"Its {pg.K} token ids (AR order: coarse first)")
                    recon = gr.Gallery(label="Reconstructions (PSNR against the input)", columns=3,
                                       elem_id="rec-gallery", height="auto")
                    psnr = gr.JSON(label="PSNR (dB, 8-bit)")
            go.click(pg.reconstruct, [image_file, rec_steps, rec_seed], [original, token_text, recon, psnr],
                     api_name="reconstruct", **ONE_AT_A_TIME)
    return app.queue()
