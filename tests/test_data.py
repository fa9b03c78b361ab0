"""Image sources, the official transform, robust decoding of bad inputs, collate and DataLoader."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from data_testutil import bad_corpus, bomb_png, encode, noise_image, write_imagefolder
from PIL import Image

from selftok.data.images import Rejected, TransformConfig, decode_image, resize_center_crop
from selftok.data.sources import (
    DataConfig,
    ImageSource,
    RejectCounter,
    ShapesSourceConfig,
    collate_samples,
    make_loader,
)

S = 16


def _tc(**kw) -> TransformConfig:
    return TransformConfig(image_size=S, **kw)


# ------------------------------------------------------------------------------------------------ decoding
def test_transform_is_short_side_resize_then_center_crop():
    # no resize needed (short side == S): the crop is the exact centre rows, top = round((24 - 16) / 2) = 4
    rows = np.repeat(np.arange(24, dtype=np.uint8)[:, None, None] * 10, 16, axis=1).repeat(3, axis=2)
    out = decode_image(encode(Image.fromarray(rows)), _tc())
    assert out.shape == (3, S, S) and out.dtype == torch.uint8
    assert out[0, :, 0].tolist() == [10 * r for r in range(4, 20)]
    # 40x30 → short side 30 → 16: width int(16 * 40 / 30) = 21, left = round(2.5) = 2 (as torchvision computes)
    image = noise_image(40, 30, 1)
    crop = resize_center_crop(image, S)
    expected = image.resize((21, 16), Image.BILINEAR).crop((2, 0, 18, 16))
    assert crop.size == (S, S) and np.array_equal(np.asarray(crop), np.asarray(expected))


@pytest.mark.parametrize("alpha, expected", [("white", 255), ("black", 0), ("drop", 10)])
def test_alpha_policy(alpha, expected):
    image = Image.new("RGBA", (S, S), (10, 10, 10, 0))  # fully transparent dark pixels
    out = decode_image(encode(image), _tc(alpha=alpha))
    assert out.unique().tolist() == [expected]


def test_alpha_reject_and_opaque_alpha_passes():
    with pytest.raises(Rejected, match="^alpha:"):
        decode_image(encode(Image.new("RGBA", (S, S), (10, 10, 10, 128))), _tc(alpha="reject"))
    opaque = decode_image(encode(Image.new("RGBA", (S, S), (10, 20, 30, 255))), _tc(alpha="reject"))
    assert opaque[:, 0, 0].tolist() == [10, 20, 30]
    half = decode_image(encode(Image.new("LA", (S, S), (0, 128))), _tc(alpha="white"))
    assert abs(int(half[0, 0, 0]) - 127) <= 1  # 0 over white at alpha 128/255


def test_mode_conversions():
    gray = decode_image(encode(Image.new("L", (S, S), 77)), _tc())
    assert gray[:, 0, 0].tolist() == [77, 77, 77]
    gray16 = decode_image(encode(Image.fromarray(np.full((S, S), 32896, np.uint16))), _tc())
    assert gray16[:, 0, 0].tolist() == [128, 128, 128]  # 32896 / 257 = 128 (not clipped to 255)
    cmyk = decode_image(encode(Image.new("CMYK", (S, S), (0, 255, 255, 0)), "JPEG"), _tc())
    assert cmyk[0].float().mean() > 240 and cmyk[1:].float().mean() < 15  # red
    palette = Image.new("P", (S, S), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    assert decode_image(encode(palette), _tc())[:, 0, 0].tolist() == [0, 0, 255]
    bw = decode_image(encode(Image.new("1", (S, S), 1)), _tc())
    assert bw.unique().tolist() == [255]


def test_small_images_policy_and_bomb_guard():
    tiny = encode(noise_image(8, 30))
    assert decode_image(tiny, _tc()).shape == (3, S, S)  # upscaled by default, like the official transform
    with pytest.raises(Rejected, match="^too_small:"):
        decode_image(tiny, _tc(small_images="reject"))
    with pytest.raises(Rejected, match="^too_small:"):
        decode_image(tiny, _tc(min_side=10))
    with pytest.raises(Rejected, match="^too_large: 30000x30000"):
        decode_image(bomb_png(30000, 30000), _tc())  # far above Pillow's limit, still only a reject
    with pytest.raises(Rejected, match="^too_large:"):
        decode_image(encode(noise_image(20, 20)), _tc(max_pixels=399))
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's global limit is restored


def test_every_bad_input_is_a_reject_with_its_reason():
    cfg = _tc(small_images="reject")
    for name, data, _, kind in bad_corpus():
        if kind == "missing_caption":
            continue
        if kind is None:
            assert decode_image(data, cfg).shape == (3, S, S), name
        else:
            with pytest.raises(Rejected, match=f"^{kind}:"):
                decode_image(data, cfg)


# ------------------------------------------------------------------------------------------------ sources
def _folder_cfg(path, **kw) -> DataConfig:
    return DataConfig(kind="imagefolder", path=str(path), cache_dir=str(path.parent / "hf_cache"),
                      transform=_tc(small_images="reject"), **kw)


def test_imagefolder_accounts_for_every_file_through_workers(tmp_path):
    folder = write_imagefolder(tmp_path / "images")
    corpus = bad_corpus()
    source = ImageSource(_folder_cfg(folder, missing_caption="skip"))
    assert len(source) == len(corpus)
    counter, kept = RejectCounter(), {}
    for batch in make_loader(source, batch_size=4, num_workers=2):
        counter.add(batch.rejects)
        assert batch.pixels.shape == (len(batch), 3, S, S)
        kept.update(zip(batch.ids, batch.captions))
    expected = {name: kind for name, _, _, kind in corpus}
    assert set(kept) == {n for n, k in expected.items() if k is None}
    assert counter.total + len(kept) == len(corpus)
    assert sorted((r.source_id, r.reason.split(":")[0]) for r in counter.examples) == sorted(
        (n, k) for n, k in expected.items() if k is not None)
    assert kept["good.png"] == ["a good image", "another caption"]  # several captions kept, in order


def test_missing_caption_keep_and_stable_ids(tmp_path):
    folder = write_imagefolder(tmp_path / "images")
    a, b = ImageSource(_folder_cfg(folder)), ImageSource(_folder_cfg(folder))
    samples = [a[i] for i in range(len(a))]
    assert [s.id for s in samples] == [b[i].id for i in range(len(b))]
    by_id = {s.id: s for s in samples}
    assert by_id["nocaption.png"].reject is None and by_id["nocaption.png"].captions == []
    assert by_id["emptycaption.png"].reject is None


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tf:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_source_with_txt_and_json_captions(tmp_path):
    good, bad = encode(noise_image(20, 20)), b"garbage"
    for t in range(2):
        _write_tar(tmp_path / f"part-{t:03d}.tar", [
            ("a.png", good), ("a.txt", b"plain text"), ("a.json", json.dumps({"caption": "from json",
                                                                                "alt": ["x", "y"]}).encode()),
            ("b.png", bad), ("b.txt", b"bad"), ("b.json", json.dumps({"caption": None, "alt": []}).encode()),
        ])
    cfg = DataConfig(kind="webdataset", path=str(tmp_path), caption_columns=["txt", "json.caption", "json.alt"],
                     cache_dir=str(tmp_path / "hf_cache"), transform=_tc())
    source = ImageSource(cfg)
    batch = collate_samples([source[i] for i in range(len(source))])
    assert batch.ids == ["part-000.tar/a", "part-001.tar/a"]
    assert batch.captions[0] == ["plain text", "from json", "x", "y"]
    assert [(r.source_id, r.reason.split(":")[0]) for r in batch.rejects] == [
        ("part-000.tar/b", "not_an_image"), ("part-001.tar/b", "not_an_image")]


def test_parquet_source_with_image_struct_or_bytes(tmp_path):
    import datasets
    images = [noise_image(20, 20, i) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"image": images, "caption": ["c0", None, "c2"], "alt": [["a0"], [], ["a2", "b2"]], "key": ["k0", "k1", "k2"],
         "score": [0.5, 0.25, 1.0]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                    "alt": datasets.List(datasets.Value("string")), "key": datasets.Value("string"),
                                    "score": datasets.Value("float32")}))
    ds.to_parquet(str(tmp_path / "data-0.parquet"))
    cfg = DataConfig(kind="parquet", path=str(tmp_path / "*.parquet"), caption_columns=["caption", "alt"],
                     id_column="key", meta_columns=["score"], missing_caption="skip",
                     cache_dir=str(tmp_path / "hf_cache"), transform=_tc())
    source = ImageSource(cfg)
    samples = [source[i] for i in range(len(source))]
    assert [s.id for s in samples] == ["k0", "k1", "k2"]
    assert [s.captions for s in samples] == [["c0", "a0"], [], ["c2", "a2", "b2"]]
    assert samples[1].reject.startswith("missing_caption") and json.loads(samples[2].meta) == {"score": 1.0}
    expected = np.asarray(resize_center_crop(images[2], S))
    assert np.array_equal(samples[2].pixels.permute(1, 2, 0).numpy(), expected)
    # raw binary image column, default ids
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "raw").mkdir()
    pq.write_table(pa.table({"image": pa.array([encode(images[0]), b"junk"], pa.binary()), "text": ["t0", "t1"]}),
                   tmp_path / "raw" / "x.parquet")
    raw = ImageSource(DataConfig(kind="parquet", path=str(tmp_path / "raw"), cache_dir=str(tmp_path / "hf_cache"),
                                 transform=_tc()))
    assert [raw[i].id for i in range(2)] == ["row-0", "row-1"] and raw[0].captions == ["t0"]
    assert raw[0].reject is None and raw[1].reject.startswith("not_an_image")


def test_unknown_column_is_a_clear_error(tmp_path):
    folder = write_imagefolder(tmp_path / "images", bad_corpus()[:1])
    with pytest.raises(ValueError, match="no column 'nope'"):
        ImageSource(_folder_cfg(folder, caption_columns=["nope"]))


def test_shapes_source_and_loader_images():
    cfg = DataConfig(kind="shapes", shapes=ShapesSourceConfig(n=6, size=32), transform=_tc(), limit=5)
    source = ImageSource(cfg)
    assert len(source) == 5
    batch = next(iter(make_loader(source, batch_size=5, shuffle=True, seed=3)))
    assert sorted(batch.indices) == list(range(5)) and batch.indices != list(range(5))
    assert all(i.startswith("train-0-") for i in batch.ids) and all(batch.captions)
    assert "spec" in json.loads(batch.meta[0])
    images = batch.to_images()
    assert images.dtype == torch.float32 and images.shape == (5, 3, S, S)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    again = ImageSource(cfg)[batch.indices[0]]
    assert torch.equal(again.pixels, batch.pixels[0]) and again.id == batch.ids[0]


def test_collate_of_only_rejects_is_an_empty_batch():
    from selftok.data.sources import Sample
    batch = collate_samples([Sample(0, "a", None, [], None, "corrupt: x"), Sample(1, "b", None, [], None, "empty: y")])
    assert len(batch) == 0 and batch.pixels.shape[0] == 0 and [r.index for r in batch.rejects] == [0, 1]
