"""Image decoding and transforms, with PIL, numpy and torch only (no torchvision).

- :func:`decode_image` turns encoded bytes into an RGB ``PIL.Image`` whatever the stored mode (grayscale, CMYK,
  palette, RGBA/LA with transparency composited on white, 16-bit grayscale scaled down to 8 bits).
- :class:`ImageTransform` resizes and normalises to a float tensor ``(3, H, W)``.
- :class:`RandAugment` is a PIL re-implementation of the RandAugment(n=2, m=9) that PuMer/ViLT train with.
- :func:`backbone_image_config` gives the image settings a backbone family was trained with.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

Resize = Literal["square_bicubic", "square_bilinear", "shorter_side"]
RESIZE_MODES: tuple[str, ...] = ("square_bicubic", "square_bilinear", "shorter_side")

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
HALF: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImageConfig:
    """Image settings of a backbone family: side length, normalisation and resize rule."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: Resize


def backbone_image_config(family: Literal["clip", "vilt"], image_size: int = 384) -> ImageConfig:
    """Image settings a backbone family expects.

    ``"clip"`` (METER's CLIP vision tower): square bicubic resize, CLIP mean/std. ``"vilt"``: square bilinear
    resize, mean/std 0.5 (what PuMer's ViLT runs use; pass ``resize="shorter_side"`` to the DataModule for the
    original ViLT's aspect-preserving resize).
    """
    if family == "clip":
        return ImageConfig(image_size, CLIP_MEAN, CLIP_STD, "square_bicubic")
    if family == "vilt":
        return ImageConfig(image_size, HALF, HALF, "square_bilinear")
    raise ValueError(f"family={family!r}: expected 'clip' or 'vilt'")


# ---------------------------------------------------------------------------------------------- decoding
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparent pixels are composited on white (dropping alpha would expose whatever colour the encoder left
    under them). 16/32-bit grayscale is scaled from the 16-bit range to 8 bits instead of being clipped, which
    would turn most of the image white.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT or mode == "I":
        arr = np.asarray(img).astype(np.float32) / 257.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        scale = 255.0 if float(arr.max(initial=0.0)) <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (truncated files raise here, not later) and convert to RGB."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)


# ---------------------------------------------------------------------------------------------- resize + norm
def shorter_side_size(width: int, height: int, size: int, multiple: int = 32) -> tuple[int, int]:
    """ViLT's rule: shorter side to ``size``, longer side at most ``int(size * 1333 / 800)`` (639 for 384),
    then both sides floored to a multiple of ``multiple`` (the patch size)."""
    longest = int(size * 1333 / 800)
    scale = size / min(width, height)
    if max(width, height) * scale > longest:
        scale = longest / max(width, height)
    w, h = int(width * scale + 0.5), int(height * scale + 0.5)
    return max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple)


class ImageTransform:
    """Resize and normalise an RGB PIL image into a float32 tensor ``(3, H, W)``.

    Args:
        image_size: output side (square modes) or shorter side (``shorter_side``).
        mean, std: per-channel normalisation, in the 0..1 pixel scale.
        resize: ``square_bicubic``/``square_bilinear`` squash to ``image_size`` x ``image_size`` (aspect ratio
            not kept, as PuMer does); ``shorter_side`` keeps the aspect ratio (ViLT: shorter side
            ``image_size``, longer at most 1333/800 of it, both floored to ``multiple``), so tensors differ in
            size and the collate function pads them.
        augment: optional PIL augmentation applied after the resize (training only).
        output: ``"float"`` returns the normalised float32 tensor; ``"uint8"`` returns raw pixels, 4x smaller to
            move between processes and to the GPU, to be normalised later with :meth:`normalize`.
    """

    def __init__(
        self,
        image_size: int = 384,
        mean: tuple[float, float, float] = HALF,
        std: tuple[float, float, float] = HALF,
        resize: Resize = "square_bilinear",
        augment: RandAugment | None = None,
        output: Literal["float", "uint8"] = "float",
        multiple: int = 32,
    ):
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize={resize!r}: expected one of {', '.join(RESIZE_MODES)}")
        if image_size < 8:
            raise ValueError(f"image_size={image_size} is too small")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"image_mean/image_std need 3 values and std > 0, got {mean} / {std}")
        self.image_size = int(image_size)
        self.resize = resize
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment
        if output not in ("float", "uint8"):
            raise ValueError(f"output={output!r}: expected 'float' or 'uint8'")
        self.output = output
        self.multiple = multiple
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(3, 1, 1)
        self._shift = torch.tensor([m / s for m, s in zip(self.mean, self.std)]).view(3, 1, 1)

    def resize_image(self, img: Image.Image) -> Image.Image:
        s = self.image_size
        if self.resize == "square_bicubic":
            return img if img.size == (s, s) else img.resize((s, s), Image.Resampling.BICUBIC)
        if self.resize == "square_bilinear":
            return img if img.size == (s, s) else img.resize((s, s), Image.Resampling.BILINEAR)
        size = shorter_side_size(*img.size, s, self.multiple)
        return img if img.size == size else img.resize(size, Image.Resampling.BICUBIC)

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        arr = np.array(img, dtype=np.uint8)  # a writable copy: torch refuses to wrap PIL's read-only buffer
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ``(..., 3, H, W)`` (any device) -> normalised float32; float input is returned as is."""
        if pixels.is_floating_point():
            return pixels
        scale = self._scale.to(pixels.device)
        shift = self._shift.to(pixels.device)
        return pixels.float().mul_(scale).sub_(shift)

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        x = self.to_uint8(img)
        return x if self.output == "uint8" else self.normalize(x)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        img = self.resize_image(img)
        if self.augment is not None:
            img = self.augment(img, rng)
        return self.to_tensor(img)

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, resize={self.resize!r}, mean={self.mean}, "
            f"std={self.std}, augment={self.augment!r}, output={self.output!r})"
        )


# ---------------------------------------------------------------------------------------------- RandAugment
_FILL = (128, 128, 128)


def _signed(v: float, rng: random.Random) -> float:
    return v if rng.random() < 0.5 else -v


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=_FILL)


def _solarize_add(img: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    arr = np.asarray(img, dtype=np.int16)
    out = np.where(arr < threshold, np.clip(arr + add, 0, 255), arr).astype(np.uint8)
    return Image.fromarray(out, "RGB")


class RandAugment:
    """RandAugment: ``n`` operations drawn with replacement, each at magnitude ``m`` on a 0..30 scale.

    The operation list follows PuMer's (AutoContrast, Equalize, Rotate, Posterize, Solarize, SolarizeAdd,
    Color, Contrast, Brightness, Sharpness, ShearX/Y, TranslateX/Y), with no flips (they would break statements
    about left and right). The strength of an op is ``m / 30`` of its largest change, applied in a random
    direction: rotate up to 30 degrees, shear up to 0.3, translate up to 26% of the side (100 px at 384),
    colour/contrast/brightness/sharpness factors within 1 +- 0.9, posterize down to 4 bits, solarize from
    threshold 256 down to 0, solarize-add up to 110. (The reference draws the enhancement factors one-sided and
    posterizes to as few as 1 bit; this version keeps both directions and stays milder.)
    """

    OPS: tuple[str, ...] = (
        "identity",
        "autocontrast",
        "equalize",
        "rotate",
        "posterize",
        "solarize",
        "solarize_add",
        "color",
        "contrast",
        "brightness",
        "sharpness",
        "shear_x",
        "shear_y",
        "translate_x",
        "translate_y",
    )

    def __init__(self, n: int = 2, m: int = 9):
        if n < 0 or not 0 <= m <= 30:
            raise ValueError(f"RandAugment needs n >= 0 and 0 <= m <= 30, got n={n}, m={m}")
        self.n, self.m = n, m

    def apply(self, img: Image.Image, op: str, rng: random.Random) -> Image.Image:
        f = self.m / 30.0
        w, h = img.size
        if op == "identity":
            return img
        if op == "autocontrast":
            return ImageOps.autocontrast(img)
        if op == "equalize":
            return ImageOps.equalize(img)
        if op == "rotate":
            return img.rotate(_signed(30.0 * f, rng), Image.Resampling.BILINEAR, fillcolor=_FILL)
        if op == "posterize":
            return ImageOps.posterize(img, max(1, 8 - round(4 * f)))
        if op == "solarize":
            return ImageOps.solarize(img, threshold=round(256 * (1 - f)))
        if op == "solarize_add":
            return _solarize_add(img, round(110 * f))
        if op in ("color", "contrast", "brightness", "sharpness"):
            factor = 1.0 + _signed(0.9 * f, rng)
            enhancer = {
                "color": ImageEnhance.Color,
                "contrast": ImageEnhance.Contrast,
                "brightness": ImageEnhance.Brightness,
                "sharpness": ImageEnhance.Sharpness,
            }[op]
            return enhancer(img).enhance(factor)
        if op == "shear_x":
            return _affine(img, (1, _signed(0.3 * f, rng), 0, 0, 1, 0))
        if op == "shear_y":
            return _affine(img, (1, 0, 0, _signed(0.3 * f, rng), 1, 0))
        if op == "translate_x":
            return _affine(img, (1, 0, _signed(0.26 * f * w, rng), 0, 1, 0))
        if op == "translate_y":
            return _affine(img, (1, 0, 0, 0, 1, _signed(0.26 * f * h, rng)))
        raise ValueError(f"unknown RandAugment op {op!r}")

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> Image.Image:
        rng = rng or random.Random()
        for _ in range(self.n):
            img = self.apply(img, rng.choice(self.OPS), rng)
        return img

    def __repr__(self) -> str:
        return f"RandAugment(n={self.n}, m={self.m})"


def pad_to(images: list[torch.Tensor], multiple: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``(3, h, w)`` tensors to a common size (rounded up to ``multiple``), bottom/right.

    Returns the stacked tensor ``(N, 3, H, W)`` and ``pixel_mask`` ``(N, H, W)`` (int64, 1 = real pixel).
    """
    height = max(t.shape[1] for t in images)
    width = max(t.shape[2] for t in images)
    height = int(math.ceil(height / multiple) * multiple)
    width = int(math.ceil(width / multiple) * multiple)
    out = torch.zeros(len(images), 3, height, width, dtype=images[0].dtype)
    mask = torch.zeros(len(images), height, width, dtype=torch.long)
    for i, t in enumerate(images):
        out[i, :, : t.shape[1], : t.shape[2]] = t
        mask[i, : t.shape[1], : t.shape[2]] = 1
    return out, mask
