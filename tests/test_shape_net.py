"""The shape net: label maps from shapes-world samples, the LPIPS-form distance, and a fit that reads shape."""
import json

import numpy as np
import pytest
import torch
from tokenizer_testutil import single_thread  # noqa: F401

from selftok.training.shape_net import NUM_CLASSES, ShapeNet, ShapeNetConfig, label_maps, shape_distance, train_shape_net
from selftok.shapes import SHAPES, Scene, ShapeObject, make_example, shape_map


def test_shape_map_labels_each_object_with_its_shape():
    scene = Scene((ShapeObject("square", "red", 0.25, 0.25, 0.25), ShapeObject("triangle", "blue", 0.7, 0.7, 0.375)))
    m = np.asarray(shape_map(scene, 32))
    assert m.shape == (32, 32) and m[0, 0] == 0
    assert m[8, 8] == 1 + SHAPES.index("square") and m[23, 22] == 1 + SHAPES.index("triangle")
    square = (m == 1 + SHAPES.index("square")).sum()
    assert square == 8 * 8  # a 0.25-side box at 32 px, filled


def test_label_maps_from_sample_metadata():
    ex = make_example("train", 5)
    meta = json.dumps({"scene": json.loads(ex.scene.to_json())})
    maps = label_maps([meta], 16)
    assert maps.shape == (1, 16, 16) and maps.dtype == torch.int64
    assert torch.equal(maps[0], torch.from_numpy(np.asarray(shape_map(ex.scene, 16), dtype=np.int64)))
    with pytest.raises(ValueError, match="needs shapes-world training data"):
        label_maps([json.dumps({"tag": "x"})], 16)


@pytest.mark.parametrize("distance", ["features", "logits", "object_logits"])
def test_shape_distance_is_zero_on_equal_inputs_and_trains_only_the_prediction(distance):
    torch.manual_seed(0)
    net = ShapeNet(4, 4, width=16, map_size=16, depth=3, distance=distance).requires_grad_(False)
    assert len(net.blocks) == 3 + 2  # depth convolutions, then two x2 upsampling stages (4 -> 16)
    target = torch.randn(3, 4, 4, 4)
    assert torch.allclose(shape_distance(net, target.clone(), target), torch.zeros(3), atol=1e-6)
    pred = torch.randn(3, 4, 4, 4, requires_grad=True)
    d = shape_distance(net, pred, target)
    assert d.shape == (3,) and bool((d > 0).all())
    d.sum().backward()
    assert pred.grad.abs().sum() > 0
    assert net(target).shape == (3, NUM_CLASSES, 16, 16)
    with pytest.raises(ValueError, match="power-of-two multiple"):
        ShapeNet(4, 4, map_size=24)


def test_logits_distance_is_the_kl_of_the_read_shapes():
    torch.manual_seed(0)
    net = ShapeNet(4, 4, width=16, map_size=4, depth=1, distance="logits").requires_grad_(False)
    pred, target = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    p, q = torch.softmax(net(target), 1), torch.softmax(net(pred), 1)
    expected = (p * (p.log() - q.log())).sum(1).mean((1, 2))
    assert torch.allclose(shape_distance(net, pred, target), expected, atol=1e-6)
    with pytest.raises(ValueError, match="features, logits, object_logits"):
        ShapeNetConfig(distance="edges")


def test_object_logits_distance_ignores_background_cells():
    # the per-cell KL weighted by the target's object probability, normalised by that probability's sum
    torch.manual_seed(0)
    net = ShapeNet(4, 4, width=16, map_size=4, depth=1, distance="object_logits").requires_grad_(False)
    target, pred = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    p, q = torch.softmax(net(target), 1), torch.softmax(net(pred), 1)
    kl = (p * (p.log() - q.log())).sum(1)
    weight = 1 - p[:, 0]
    expected = (kl * weight).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1.0)
    assert torch.allclose(shape_distance(net, pred, target), expected, atol=1e-6)
    with torch.no_grad():  # a scene read as all background: 0, not 0 / 0
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([50.0] + [0.0] * (NUM_CLASSES - 1)))
    assert float(shape_distance(net, pred, target)) < 1e-6


def test_train_shape_net_learns_the_map_and_is_deterministic():
    # latents that are the label map itself (one-hot, downsampled): the net only has to read it back
    torch.manual_seed(0)
    labels = torch.randint(0, NUM_CLASSES, (64, 1, 1)).expand(64, 8, 8).clone()
    latents = torch.nn.functional.one_hot(labels[:, ::2, ::2], NUM_CLASSES).permute(0, 3, 1, 2).float()
    cfg = ShapeNetConfig(steps=60, batch_size=16, width=16, map_size=8, images=64)
    net, metrics = train_shape_net(cfg, latents, labels, seed=0)
    assert metrics["pixel_accuracy"] > 0.9 and metrics["val_images"] == 8
    net2, _ = train_shape_net(cfg, latents, labels, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
