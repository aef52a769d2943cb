from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from data_helpers import image_bytes, png16_gray, png16_rgb
from PIL import Image

from pumer_lightning.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    ImageTransform,
    RandAugment,
    backbone_image_config,
    decode_image,
    pad_to,
    shorter_side_size,
)


def test_decode_converts_every_mode_to_rgb():
    assert decode_image(image_bytes((10, 20, 30))).getpixel((0, 0)) == (10, 20, 30)
    gray = decode_image(image_bytes((90, 90, 90), mode="L"))
    assert gray.mode == "RGB" and gray.getpixel((1, 1)) == (90, 90, 90)
    cmyk = decode_image(image_bytes((0, 0, 255), fmt="JPEG", mode="CMYK"))
    r, g, b = cmyk.getpixel((5, 5))
    assert cmyk.mode == "RGB" and b > 200 and r < 40 and g < 40
    # A fully transparent pixel must come out white, not whatever colour the encoder stored under it.
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    buf = io.BytesIO()
    half.save(buf, "PNG")
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (127, 127, 127)


def test_decode_sixteen_bit_scales_instead_of_clipping():
    g = decode_image(png16_gray(40000))
    assert g.mode == "RGB" and g.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 257 = 155.6
    rgb = decode_image(png16_rgb((65535, 0, 32768)))
    assert rgb.getpixel((0, 0)) == (255, 0, 128)


def test_decode_rejects_garbage_and_truncation():
    with pytest.raises(OSError):
        decode_image(b"definitely not an image")
    data = image_bytes((1, 2, 3), size=(64, 64), fmt="JPEG")
    with pytest.raises(OSError, match="(?i)truncated"):
        decode_image(data[: len(data) // 2])


def test_square_resize_and_normalisation_values():
    t = ImageTransform(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="square_bilinear")
    x = t(Image.new("RGB", (50, 20), (255, 0, 51)))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[:, 7, 9], torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1]), atol=1e-6)
    clip = ImageTransform(24, CLIP_MEAN, CLIP_STD, "square_bicubic")
    y = clip(Image.new("RGB", (10, 10), (128, 128, 128)))
    want = torch.tensor([(128 / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    assert y.shape == (3, 24, 24) and torch.allclose(y[:, 3, 3], want, atol=1e-5)


def test_uint8_output_normalises_later_to_the_same_values():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    f = ImageTransform(16, CLIP_MEAN, CLIP_STD, "square_bicubic")
    u = ImageTransform(16, CLIP_MEAN, CLIP_STD, "square_bicubic", output="uint8")
    raw = u(img)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 16, 16)
    assert torch.allclose(u.normalize(raw[None])[0], f(img), atol=1e-6)


@pytest.mark.parametrize(
    ("size", "want"),
    [((640, 480), (512, 384)), ((480, 640), (384, 512)), ((2000, 500), (608, 160)), ((500, 375), (512, 384))],
)
def test_shorter_side_rule(size, want):
    assert shorter_side_size(*size, 384) == want
    t = ImageTransform(384, resize="shorter_side")
    assert tuple(t(Image.new("RGB", size)).shape[1:]) == (want[1], want[0])


def test_pad_to_multiple_and_mask():
    a, b = torch.ones(3, 10, 33), torch.ones(3, 20, 5)
    out, mask = pad_to([a, b], 32)
    assert out.shape == (2, 3, 32, 64) and mask.shape == (2, 32, 64)
    assert mask[0].sum() == 10 * 33 and mask[1].sum() == 20 * 5
    assert out[0, :, 10:].abs().sum() == 0


def test_backbone_presets():
    clip = backbone_image_config("clip")
    assert (clip.image_size, clip.mean, clip.std, clip.resize) == (384, CLIP_MEAN, CLIP_STD, "square_bicubic")
    vilt = backbone_image_config("vilt", 224)
    assert (vilt.image_size, vilt.mean, vilt.std, vilt.resize) == (
        224,
        (0.5,) * 3,
        (0.5,) * 3,
        "square_bilinear",
    )
    with pytest.raises(ValueError, match="family"):
        backbone_image_config("resnet")  # type: ignore[arg-type]


def test_randaugment_every_op_keeps_size_and_is_seeded():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    ra = RandAugment(2, 9)
    changed = 0
    for op in RandAugment.OPS:
        out = ra.apply(img, op, random.Random(0))
        assert out.size == img.size and out.mode == "RGB", op
        changed += op != "identity" and not np.array_equal(np.asarray(out), np.asarray(img))
    assert changed >= len(RandAugment.OPS) - 2  # every real op alters a random image
    a = np.asarray(ra(img, random.Random(5)))
    b = np.asarray(ra(img, random.Random(5)))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="RandAugment"):
        RandAugment(2, 31)


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="resize"):
        ImageTransform(32, resize="crop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_std"):
        ImageTransform(32, std=(0.5, 0.0, 0.5))
