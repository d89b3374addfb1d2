"""Common corruptions (Hendrycks & Dietterich 2019, ImageNet-C / CIFAR-10-C) as a pp op.

    pp = "decode|corrupt('gaussian_noise', 3)|resize(64)|rgb|value_range(-1, 1)"

`corrupt(name, severity)` applies one corruption at severity 1..5 to a uint8 HWC image
(1 or 3 channels) and returns uint8. Random corruptions draw from the example's pipeline
RNG, so a corrupted split is the same on every run and machine. The severity constants
are those of CIFAR-10-C (the small-image variant, which suits 28-64 px inputs):

  noise     gaussian_noise   x + N(0, s)                    s = .04 .06 .08 .09 .10
            shot_noise       Poisson(x * l) / l             l = 500 250 100 75 50
            impulse_noise    salt and pepper, fraction a    a = .01 .02 .03 .05 .07
            speckle_noise    x + x * N(0, s)                s = .06 .10 .12 .16 .20
  blur      gaussian_blur    Gaussian, sigma                    .4 .6 .7 .8 1
            defocus_blur     disk of radius r, then Gaussian    r = .3 .4 .5 1 1.5
            motion_blur      a line of length k at a random angle  k = 3 5 7 9 11 (px at 32)
  weather   fog              + t * plasma fractal, then rescale  t = .2 .5 .75 1 1.5
            brightness       V += b in HSV                       b = .05 .1 .15 .2 .3
  digital   contrast         (x - mean) * c + mean               c = .75 .5 .4 .3 .15
            saturate         S * a + b in HSV          (a,b) = (.3,0) (.1,0) (1.5,0) (2,.1) (2.5,.2)
            pixelate         box-downsample by f, then back      f = .95 .9 .85 .75 .65
            jpeg_compression JPEG at quality q                   q = 80 65 58 50 40

x is in [0, 1] throughout; results are clipped to [0, 1] and rounded to uint8. Blur sizes
scale with the image (defined at 32 px), so severities mean the same at 28 or 64 px.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from tljax.data.preprocess import Example, ExampleOp, register

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _scale(image: np.ndarray) -> float:
    return max(image.shape[0], image.shape[1]) / 32


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    s = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    return x + rng.normal(0, s, x.shape)


def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    lam = (500, 250, 100, 75, 50)[severity - 1]
    return rng.poisson(x * lam) / lam


def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    amount = (0.01, 0.02, 0.03, 0.05, 0.07)[severity - 1]
    out = x.copy()
    hit = rng.random(x.shape) < amount
    out[hit] = (rng.random(x.shape) < 0.5)[hit]  # half salt (1), half pepper (0)
    return out


def speckle_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    s = (0.06, 0.10, 0.12, 0.16, 0.20)[severity - 1]
    return x + x * rng.normal(0, s, x.shape)


def _blur(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return np.stack([ndimage.convolve(x[..., c], kernel, mode="reflect")
                     for c in range(x.shape[-1])], axis=-1)


def gaussian_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1] * _scale(x)
    return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="reflect")


def defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    radius, alias = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))[severity - 1]
    radius *= _scale(x)
    size = int(np.ceil(radius)) + 1
    yy, xx = np.mgrid[-size:size + 1, -size:size + 1]
    disk = ((xx ** 2 + yy ** 2) <= max(radius, 0.5) ** 2).astype(np.float64)
    disk = ndimage.gaussian_filter(disk / disk.sum(), sigma=alias * _scale(x))
    return _blur(x, disk / disk.sum())


def motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    length = max(2, round((3, 5, 7, 9, 11)[severity - 1] * _scale(x)))
    angle = rng.uniform(-np.pi / 4, np.pi / 4)
    kernel = np.zeros((length, length))
    centre = (length - 1) / 2
    for t in np.linspace(-centre, centre, 4 * length):
        kernel[int(round(centre + t * np.sin(angle))), int(round(centre + t * np.cos(angle)))] = 1
    return _blur(x, kernel / kernel.sum())


def plasma_fractal(size: int, rng: np.random.Generator, wibble: float = 3.0) -> np.ndarray:
    """A (size, size) diamond-square fractal in [0, 1] (size a power of two)."""
    grid = np.zeros((size, size))
    step, scale = size, 1.0
    while step > 1:
        half = step // 2
        # Diamond: the centre of every square is its corners' mean plus noise.
        corners = grid[0:size:step, 0:size:step]
        mean = (corners + np.roll(corners, -1, 0) + np.roll(corners, -1, 1)
                + np.roll(np.roll(corners, -1, 0), -1, 1)) / 4
        grid[half:size:step, half:size:step] = mean + rng.uniform(-scale, scale, mean.shape)
        # Square: edge midpoints from their two corners and two centres.
        centres = grid[half:size:step, half:size:step]
        top = (corners + np.roll(corners, -1, 1) + centres + np.roll(centres, 1, 0)) / 4
        left = (corners + np.roll(corners, -1, 0) + centres + np.roll(centres, 1, 1)) / 4
        grid[0:size:step, half:size:step] = top + rng.uniform(-scale, scale, top.shape)
        grid[half:size:step, 0:size:step] = left + rng.uniform(-scale, scale, left.shape)
        step, scale = half, scale / wibble
    grid -= grid.min()
    return grid / max(grid.max(), 1e-12)


def fog(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    thickness, wibble = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))[severity - 1]
    h, w = x.shape[:2]
    size = 1 << int(np.ceil(np.log2(max(h, w, 2))))
    haze = plasma_fractal(size, rng, wibble)[:h, :w, None]
    peak = x.max()
    return (x + thickness * haze) * peak / (peak + thickness)


def _hsv(x: np.ndarray) -> np.ndarray:
    rgb = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
    image = Image.fromarray(np.uint8(np.clip(rgb, 0, 1) * 255 + 0.5), "RGB")
    return np.asarray(image.convert("HSV"), np.float64) / 255


def _from_hsv(hsv: np.ndarray, channels: int) -> np.ndarray:
    image = Image.fromarray(np.uint8(np.clip(hsv, 0, 1) * 255 + 0.5), "HSV").convert("RGB")
    rgb = np.asarray(image, np.float64) / 255
    return rgb.mean(axis=-1, keepdims=True) if channels == 1 else rgb


def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    if x.shape[-1] == 1:  # gray: V is the value itself
        return x + (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    hsv = _hsv(x)
    hsv[..., 2] += (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    return _from_hsv(hsv, x.shape[-1])


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    mean = x.mean(axis=(0, 1), keepdims=True)
    return (x - mean) * c + mean


def saturate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    a, b = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))[severity - 1]
    if x.shape[-1] == 1:  # a gray image has no saturation to change
        return x
    hsv = _hsv(x)
    hsv[..., 1] = hsv[..., 1] * a + b
    return _from_hsv(hsv, x.shape[-1])


def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1]
    h, w, c = x.shape
    image = Image.fromarray(np.uint8(np.clip(x, 0, 1) * 255 + 0.5).squeeze(-1) if c == 1
                            else np.uint8(np.clip(x, 0, 1) * 255 + 0.5))
    small = image.resize((max(1, int(w * factor)), max(1, int(h * factor))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BOX), np.float64).reshape(h, w, c) / 255


def jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = (80, 65, 58, 50, 40)[severity - 1]
    h, w, c = x.shape
    pixels = np.uint8(np.clip(x, 0, 1) * 255 + 0.5)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if c == 1 else pixels).save(buffer, "JPEG",
                                                                   quality=quality)
    return np.asarray(Image.open(buffer), np.float64).reshape(h, w, c) / 255


CORRUPTIONS: dict[str, Corruption] = {
    f.__name__: f for f in (
        gaussian_noise, shot_noise, impulse_noise, speckle_noise,
        gaussian_blur, defocus_blur, motion_blur,
        fog, brightness,
        contrast, saturate, pixelate, jpeg_compression)
}
FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("gaussian_blur", "defocus_blur", "motion_blur"),
    "weather": ("fog", "brightness"),
    "digital": ("contrast", "saturate", "pixelate", "jpeg_compression"),
}


def apply(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """`image` (uint8 HWC) with corruption `name` at `severity` (1..5), as uint8."""
    x = np.asarray(image, np.float64) / 255
    out = CORRUPTIONS[name](x, severity, rng)
    return np.uint8(np.clip(out, 0, 1) * 255 + 0.5)


@register("corrupt", random=True)
def corrupt(name: str, severity: int = 3) -> ExampleOp:
    """One common corruption (see the module docstring) at severity 1..5."""
    if name not in CORRUPTIONS:
        from tljax.config import closest

        raise ValueError(f"corrupt({name!r}): unknown corruption{closest(name, CORRUPTIONS)}; "
                         f"known: {', '.join(CORRUPTIONS)}.")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"corrupt({name!r}, {severity!r}): severity must be 1..5.")

    def op(example: Example, rng: np.random.Generator) -> Example:
        image = example["image"]
        if image.dtype != np.uint8:
            raise ValueError(f"corrupt({name!r}) works on uint8 images: put it before "
                             "value_range / normalize in pp.")
        return {**example, "image": apply(image, name, severity, rng)}

    return op
