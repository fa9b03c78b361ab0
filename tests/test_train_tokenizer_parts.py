"""Pure parts of tokenizer training: LR schedule, batch schedule, objectives, renderer init, SD3 key mapping,
metrics and the perceptual-weights loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from selftok.loaders.sd3 import SD3_PREFIX, ignored_sd3_names, load_sd3_image_stream, map_sd3_state_dict
from selftok.model.mmdit import MMDiT, MMDiTConfig
from selftok.model.renderer import Renderer, RendererConfig
from selftok.train import attention_kernel, lr_factor, step_generator, uses_math_attention
from selftok.training import objectives
from selftok.shapes import Scene, ShapeObject, render_scene
from selftok.training.evaluation import MISSED, shape_accuracy, shape_confusion
from selftok.training.metrics import psnr, ssim
from selftok.training.stages import OptimConfig, is_image_stream, renderer_init_from_decoder
from selftok.training.stream import batch_indices


def test_lr_factor_warmup_and_decays():
    o = OptimConfig(warmup_steps=4, decay="cosine", final_lr_fraction=0.1)
    assert [lr_factor(s, 20, o) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 20, o) == pytest.approx(1.0)
    assert lr_factor(19, 20, o) == pytest.approx(0.1)
    assert lr_factor(19, 20, OptimConfig(decay="linear", final_lr_fraction=0.0)) == pytest.approx(0.0)
    assert lr_factor(7, 20, OptimConfig()) == 1.0  # official: constant


def test_batch_indices_partition_each_global_batch_and_epoch():
    n, bs, world = 50, 4, 3  # 12 per global batch, 4 global batches per epoch (2 items dropped)
    seen = []
    for step in range(4):
        shares = [batch_indices(step, n, bs, r, world, seed=7) for r in range(world)]
        assert all(len(s) == bs for s in shares)
        flat = [i for s in shares for i in s]
        assert len(set(flat)) == len(flat)   # ranks never share an item within a step
        seen += flat
    assert len(set(seen)) == 48               # one epoch: no item twice
    assert batch_indices(5, n, bs, 1, world, 7) == batch_indices(5, n, bs, 1, world, 7)  # pure
    assert batch_indices(4, n, bs, 0, world, 7) != batch_indices(0, n, bs, 0, world, 7)  # new epoch, new order
    with pytest.raises(ValueError, match="fewer than one global batch"):
        batch_indices(0, 10, 4, 0, 3, 0)


def test_step_generator_depends_on_every_key():
    draws = {key: torch.rand(3, generator=step_generator(*key)).tolist()
             for key in [(0, "stage1", 5, 0), (1, "stage1", 5, 0), (0, "stage2", 5, 0), (0, "stage1", 6, 0),
                         (0, "stage1", 5, 1)]}
    assert len({tuple(v) for v in draws.values()}) == len(draws)
    assert torch.rand(3, generator=step_generator(0, "stage1", 5, 0)).tolist() == draws[(0, "stage1", 5, 0)]


def test_delayed_ramp():
    assert [objectives.delayed_ramp(s, 2, 4) for s in range(7)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert objectives.delayed_ramp(0, 0, 0) == 1.0


def test_flow_batch_visibility_dropout_and_shift():
    last = lambda t: (t * 8).long().clamp(0, 7)
    fb = objectives.draw_flow_batch(last, (64, 3, 4, 4), 8, torch.Generator().manual_seed(0), shift=3.0,
                                    condition_dropout=0.25)
    assert torch.allclose(fb.t_model, 3 * fb.t / (1 + 2 * fb.t))
    assert fb.visible[fb.dropped].sum() == 0                       # dropped samples see no token
    kept = ~fb.dropped
    assert torch.equal(fb.visible[kept].sum(1), last(fb.t[kept]) + 1)  # a prefix of length k(t)+1
    assert 0 < fb.dropped.sum() < 64


def test_bucket_losses_pool_sums_and_counts():
    per = torch.tensor([1.0, 2.0, 3.0, 4.0])
    t = torch.tensor([0.1, 0.5, 0.9, 0.35])
    dropped = torch.tensor([False, True, False, False])
    b = objectives.bucket_losses(per, t, dropped)
    assert b["loss_small"] == (5.0, 2) and b["loss_mid"] == (2.0, 1) and b["loss_large"] == (3.0, 1)
    assert b["loss_uncon"] == (2.0, 1)


def test_gradient_loss_ignores_offsets_and_sees_blur():
    x = torch.zeros(1, 3, 16, 16)
    x[..., 4:12, 4:12] = 1
    assert objectives.gradient_loss(x + 0.3, x).item() == pytest.approx(0.0, abs=1e-6)
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    assert objectives.gradient_loss(blurred, x).item() > 0.01


def test_renderer_loss_terms():
    pred, target = torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)
    loss, terms = objectives.renderer_loss(pred, target, mse_weight=1.0, l1_weight=0.5)
    assert terms == {"mse": 1.0, "l1": 1.0} and loss.item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="pixel"):
        objectives.renderer_loss(pred, target, gradient_weight=1.0)


def test_renderer_initialised_from_decoder_predicts_its_x0_guess():
    torch.manual_seed(0)
    K, C, L = 6, 12, 8
    dcfg = MMDiTConfig(depth=2, num_heads=2, head_dim=8, context_see_xt=False)
    decoder = MMDiT(dcfg, K, C, 5, L)
    for p in decoder.parameters():                      # make the zero-initialised gates non-trivial
        p.data.add_(0.05 * torch.randn_like(p))
    renderer = Renderer(RendererConfig(depth=2, num_heads=2, head_dim=8), K, C, 5, L)
    copied = renderer_init_from_decoder(renderer, decoder)
    assert any(n.startswith("joint_blocks.") for n in copied) and "context_embedder.weight" in copied
    vectors = torch.randn(3, K, 5)
    with torch.no_grad():
        v = decoder(torch.zeros(3, C, L, L), torch.ones(3), vectors)
        x0 = renderer(vectors)
    # at t = 1 from x_t = 0 the decoder's clean-latent estimate is x_t − t·v = −v
    assert torch.allclose(x0, -v, atol=1e-5)


def test_fresh_models_pass_image_information_from_the_first_step():
    """The training inits (open encoder query gates, sin-cos renderer table): a fresh encoder already tells
    two images apart, and a fresh renderer's patches start from the smooth 2-D table (docs: the CPU recipe)."""
    from selftok.model.encoder import EncoderConfig, QFormerEncoder
    from selftok.model.layers import sincos_2d

    torch.manual_seed(0)
    enc = QFormerEncoder(EncoderConfig(patch_size=2, hidden_size=32, num_heads=2, depth=2, query_dim=32,
                                       query_heads=2), num_tokens=4, in_channels=3, latent_size=8)
    a, b = enc(torch.randn(1, 3, 8, 8)), enc(torch.randn(1, 3, 8, 8))
    assert (a - b).abs().max() > 0.05  # with AdaLN-Zero gates both would be the bare query tokens
    r = Renderer(RendererConfig(depth=1, num_heads=2, head_dim=8, patch_size=1), num_tokens=4, out_channels=3,
                 context_dim=8, latent_size=4)
    assert torch.equal(r.positional_embedding.data, sincos_2d(16, 4))


def test_explicit_attention_matches_sdpa():
    """`run.attention: auto` runs attention as plain matmul + softmax on CPU (torch's fused CPU flash backward
    and SDPA's fp32-upcasting math backend are slow on short sequences); it must give SDPA's outputs and
    gradients, keep a query row that may attend nothing finite, and stay off on GPUs."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from selftok.model.layers import attention

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 40, 40) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    results = []
    for choice in ("default", "auto"):
        with attention_kernel(choice, cpu):
            out = attention(q, k, v, mask)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        results.append((out, *grads))
    reference = sdpa(q, k, v, attn_mask=mask)
    torch.testing.assert_close(results[0][0], reference)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with attention_kernel("auto", cpu), torch.autocast("cpu", torch.bfloat16):  # the training path
        low = attention(q, k, v, mask)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, atol=0.05, rtol=0.05)
    blind = mask.clone()
    blind[0, :, 5] = False  # query row 5 of sample 0 may attend nothing
    with attention_kernel("auto", cpu):
        out = attention(q, k, v, blind)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], sdpa(q, k, v, attn_mask=blind)[1])  # other samples unaffected
    for choice, device, explicit in (("auto", cpu, True), ("math", torch.device("cuda"), True),
                                     ("auto", torch.device("cuda"), False), ("default", cpu, False)):
        assert uses_math_attention(choice, device) is explicit, (choice, device)


def test_gradient_checkpointing_recomputes_with_the_forwards_attention():
    """Checkpointed blocks are recomputed during backward, outside the forward's `attention_kernel` context;
    the recomputation must still run the explicit attention, so gradients equal the uncheckpointed ones."""
    torch.manual_seed(0)
    K, C, L = 6, 12, 8
    decoder = MMDiT(MMDiTConfig(depth=2, num_heads=2, head_dim=8, context_see_xt=False), K, C, 5, L)
    for p in decoder.parameters():                      # make the zero-initialised gates non-trivial
        p.data.add_(0.05 * torch.randn_like(p))
    x_t, t, vectors = torch.randn(3, C, L, L), torch.rand(3), torch.randn(3, K, 5)
    mask = torch.arange(K)[None] < torch.tensor([[2], [6], [0]])  # partly, fully and not visible
    grads = []
    for ckpt in (False, True):
        decoder.gradient_checkpointing = ckpt
        with attention_kernel("auto", torch.device("cpu")):
            loss = decoder(x_t, t, vectors, mask).square().sum()
        grads.append(torch.autograd.grad(loss, list(decoder.parameters())))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_image_stream_names():
    assert is_image_stream("joint_blocks.3.x_block.attn.qkv.weight")
    assert is_image_stream("x_embedder.proj.weight") and is_image_stream("mask_token")
    assert not is_image_stream("joint_blocks.3.context_block.attn.qkv.weight")
    assert not is_image_stream("final_layer.linear.weight")


def fake_sd3(decoder: MMDiT, extra_grid: int | None = None) -> dict[str, torch.Tensor]:
    """A state dict with SD3-medium's names (prefix, x/context blocks, embedders) at the decoder's sizes."""
    sd = {SD3_PREFIX + k: torch.randn_like(v) for k, v in decoder.state_dict().items()}
    D = decoder.cfg.hidden_size
    sd[SD3_PREFIX + "context_embedder.weight"] = torch.randn(D, 4096)   # SD3: 4096-d T5/CLIP features
    sd[SD3_PREFIX + "y_embedder.mlp.0.weight"] = torch.randn(D, 2048)
    sd["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)
    if extra_grid:
        sd[SD3_PREFIX + "pos_embed"] = torch.randn(1, extra_grid ** 2, D)
    return sd


def test_sd3_image_stream_mapping(tmp_path):
    torch.manual_seed(0)
    decoder = MMDiT(MMDiTConfig(depth=2, num_heads=2, head_dim=8), 4, 16, 16, 8)
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    sd = fake_sd3(decoder, extra_grid=8)                # larger table: centre-cropped to the decoder's 4×4
    path = tmp_path / "sd3_medium.safetensors"
    save_file(sd, str(path))
    loaded = load_sd3_image_stream(decoder, path)
    after = decoder.state_dict()
    for k in after:
        if k.startswith(("x_embedder.", "t_embedder.", "final_layer.")) or ".x_block." in k:
            assert k in loaded and torch.equal(after[k], sd[SD3_PREFIX + k]), k
        elif k != "pos_embed":
            assert torch.equal(after[k], before[k]), f"{k} must not come from SD3"
    table = sd[SD3_PREFIX + "pos_embed"].reshape(1, 8, 8, -1)[:, 2:6, 2:6].reshape(1, 16, -1)
    assert torch.equal(after["pos_embed"], table)
    ignored = ignored_sd3_names(list(sd))
    assert SD3_PREFIX + "context_embedder.weight" in ignored
    assert SD3_PREFIX + "joint_blocks.0.context_block.attn.qkv.weight" in ignored


def test_sd3_mapping_names_missing_and_misshaped_tensors():
    decoder = MMDiT(MMDiTConfig(depth=2, num_heads=2, head_dim=8), 4, 16, 16, 8)
    sd = fake_sd3(decoder)
    del sd[SD3_PREFIX + "joint_blocks.1.x_block.mlp.fc1.weight"]
    sd[SD3_PREFIX + "x_embedder.proj.weight"] = torch.randn(16, 4, 2, 2)
    with pytest.raises(ValueError) as e:
        map_sd3_state_dict(sd, decoder)
    assert "joint_blocks.1.x_block.mlp.fc1.weight" in str(e.value) and "x_embedder.proj.weight" in str(e.value)


def test_psnr_rounds_halves_up_like_the_official_evaluator():
    # the official evaluator writes 8-bit PNGs as floor(x·255 + 0.5): 254.5 becomes 255, so these are identical
    # (round-half-to-even made it 254 and reported 48.1 dB)
    a = torch.full((1, 3, 4, 4), 0.99803924560546875)  # x·255 = 254.5 exactly
    assert psnr(a, torch.ones(1, 3, 4, 4)).tolist() == [100.0]


def test_psnr_and_ssim_analytic():
    a = torch.zeros(2, 3, 16, 16)
    b = torch.full((2, 3, 16, 16), 0.1)
    assert psnr(a, b, quantize=False).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)  # 10·log10(1/0.01)
    assert psnr(a, a).tolist() == [100.0, 100.0]
    x = torch.rand(2, 3, 16, 16)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    # constant images: variances and covariance vanish, SSIM = (2ab + C1) / (a² + b² + C1)
    c1 = 0.01 ** 2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1)
    assert ssim(torch.full((1, 1, 12, 12), 0.2), torch.full((1, 1, 12, 12), 0.6)).item() == pytest.approx(expected, abs=1e-3)
    assert ssim(x, x.flip(-1)).mean() < 0.5


def test_perceptual_loader_is_strict(tmp_path):
    from selftok.training.perceptual import PerceptualDistance, load_perceptual
    torch.manual_seed(0)
    state = {k: v for k, v in PerceptualDistance().state_dict().items() if k.startswith("features.")}
    state.update({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))})
    good = tmp_path / "vgg.safetensors"
    save_file(state, str(good))
    model = load_perceptual(good)
    x = torch.rand(2, 3, 32, 32)
    d = model(x, x.flip(-1))
    assert d.shape == (2,) and (d > 0).all() and model(x, x).abs().max() < 1e-6
    bad = dict(state)
    del bad["features.28.weight"]
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="features.28.weight"):
        load_perceptual(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("name", ["tokenizer_shapes", "tokenizer_shapes_full", "tokenizer_shapes_pixel",
                                  "tokenizer_smoke", "tokenizer_official_512",
                                  "tokenizer_official_1024", "renderer_official_512"])
def test_shipped_configs_load_and_build(name):
    from pathlib import Path

    from selftok.runtime.config import load_config
    from selftok.train import TrainConfig

    cfg = load_config(TrainConfig, Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    assert cfg.stage1.steps + cfg.stage2.steps > 0
    if cfg.model.image_size <= 64:  # the official sizes are GPU models: build only the small ones here
        from selftok.model.tokenizer import SelftokTokenizer
        tok = SelftokTokenizer(cfg.model)
        assert tok.K == cfg.model.schedule.K
    else:
        assert cfg.model.schedule.K in (512, 1024) and cfg.model.quantizer.codebook_size == 32768


def test_shape_confusion_reads_each_object_against_its_true_shape():
    scene = Scene((ShapeObject("square", "red", 0.25, 0.25, 0.3125), ShapeObject("triangle", "blue", 0.7, 0.7, 0.375),
                   ShapeObject("circle", "green", 0.25, 0.75, 0.3125)))
    # the same scene drawn with the square as a circle, and the triangle left out
    wrong = Scene((ShapeObject("circle", "red", 0.25, 0.25, 0.3125), scene.objects[2]))
    images = torch.stack([torch.from_numpy(np.asarray(render_scene(s, 64), dtype=np.float32) / 255).permute(2, 0, 1)
                          for s in (scene, wrong)])
    table = shape_confusion(images, [scene, scene])
    assert table["square"] == {**dict.fromkeys(table["square"], 0), "square": 1, "circle": 1}
    assert table["triangle"]["triangle"] == 1 and table["triangle"][MISSED] == 1
    assert table["circle"]["circle"] == 2
    assert shape_accuracy(table) == pytest.approx(4 / 6)
    assert shape_confusion(images, [None, None])["circle"]["circle"] == 0


def test_last_evaluations_are_the_largest_step_not_the_last_name(tmp_path):
    from selftok.training.evaluation import last_evaluations
    for name in ["stage0_step500.json", "stage0_step3000.json", "stage1_step500.json", "stage1_step2500.json",
                 "stage1_step2500_renderer.json", "stage1_step2500.png", "stage2_step600.json", "notes.json",
                 "stage2_step600.txt"]:
        (tmp_path / name).write_text("{}")
    found = {stage: (step, [p.name for p in files]) for stage, (step, files) in last_evaluations(tmp_path).items()}
    assert found == {"stage0": (3000, ["stage0_step3000.json"]),
                     "stage1": (2500, ["stage1_step2500.json", "stage1_step2500.png", "stage1_step2500_renderer.json"]),
                     "stage2": (600, ["stage2_step600.json"])}
    assert last_evaluations(tmp_path / "missing") == {}
