"""Photometric changes between mapping and query images, as parameters.

`AppearanceChange` holds one concrete change; `AppearanceRange` draws one per
image (the distribution pre-training samples). Both have ``apply(image, rng)``
on uint8 HxWx3 RGB images. The pipeline, on intensities in [0, 1]:

    x * gain * wb_rgb * local light  ->  x ** gamma  ->  blur  ->  sensor noise  ->  uint8

so with ``gamma = 1`` and no clipping the mean intensity scales by ``gain``
and the channel ratios by ``wb_rgb``. FINDINGS.md: an encoder trained with
gamma 0.6-1.8 and brightness x0.4-1.4 collapsed on darkened queries, so the
strong range goes well past that (x0.08-x3, gamma 0.4-2.5, coloured light,
low-light shot noise).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cv2
import numpy as np


@dataclass(frozen=True)
class AppearanceChange:
    """One photometric change. The defaults change nothing."""

    gain: float = 1.0  # exposure x light level: multiplies intensity
    gamma: float = 1.0  # output = input ** gamma (> 1 darkens mid-tones, < 1 lifts shadows)
    wb_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel gains: white balance / coloured light
    falloff: float = 0.0  # 0..1: a light pool of random centre; the far corners darken by this fraction
    shadows: float = 0.0  # 0..1: darkness of soft shadow shapes cast across the image
    n_shadows: int = 2
    blur_sigma_px: float = 0.0  # Gaussian defocus
    motion_blur_px: float = 0.0  # length of a linear motion blur at a random angle
    photons: float = 0.0  # full-scale photon count of the shot noise (lower = noisier); 0 = no shot noise
    read_noise: float = 0.0  # additive Gaussian noise std on [0, 1] intensities

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The changed uint8 image; ``rng`` places shadows, blur direction and noise."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}")
        x = image.astype(np.float32) / 255.0
        h, w = x.shape[:2]
        x *= np.float32(self.gain) * np.asarray(self.wb_rgb, np.float32)
        if self.falloff > 0 or self.shadows > 0:
            x *= self.local_light(h, w, rng)[:, :, None]
        x = np.clip(x, 0.0, 1.0)
        if self.gamma != 1.0:
            x = x ** np.float32(self.gamma)
        if self.blur_sigma_px > 0:
            x = cv2.GaussianBlur(x, (0, 0), self.blur_sigma_px)
        if self.motion_blur_px >= 1:
            x = cv2.filter2D(x, -1, motion_kernel(self.motion_blur_px, rng.uniform(0, np.pi)))
        if self.photons > 0:
            # Shot noise: Poisson photon counts, approximated as Gaussian with variance x / photons.
            # Blur kernels can ring slightly below zero; no photons there.
            x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.sqrt(np.maximum(x, 0.0) / self.photons)
        if self.read_noise > 0:
            x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(self.read_noise)
        return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def local_light(self, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        """HxW multiplier <= 1: a radial light pool and soft shadow shapes."""
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        out = np.ones((h, w), np.float32)
        if self.falloff > 0:
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            r2 = ((ys - cy) ** 2 + (xs - cx) ** 2) / (h * h + w * w)
            out *= 1.0 - self.falloff * np.clip(r2 / 0.5, 0.0, 1.0)
        if self.shadows > 0:
            mask = np.zeros((h, w), np.float32)
            for _ in range(self.n_shadows):
                pts = np.stack([rng.uniform(-0.2, 1.2, 4) * w, rng.uniform(-0.2, 1.2, 4) * h], 1)
                cv2.fillConvexPoly(mask, cv2.convexHull(pts.astype(np.int32)), 1.0)
            soft = max(1.0, 0.02 * max(h, w))
            out *= 1.0 - self.shadows * cv2.GaussianBlur(mask, (0, 0), soft)
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def motion_kernel(length_px: float, angle: float) -> np.ndarray:
    """A normalized line kernel of ``length_px`` at ``angle`` radians."""
    k = int(np.ceil(length_px)) | 1
    kernel = np.zeros((k, k), np.float32)
    c, d = (k - 1) / 2, np.array([np.cos(angle), np.sin(angle)]) * (length_px - 1) / 2
    cv2.line(kernel, (int(round(c - d[0])), int(round(c - d[1]))), (int(round(c + d[0])), int(round(c + d[1]))), 1.0)
    return kernel / kernel.sum()


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


@dataclass(frozen=True)
class AppearanceRange:
    """A distribution of `AppearanceChange`s; ``apply`` draws a fresh one per image."""

    gain: tuple[float, float] = (0.08, 3.0)  # log-uniform; far past FINDINGS' x0.4-1.4
    gamma: tuple[float, float] = (0.4, 2.5)  # log-uniform; past 0.6-1.8
    wb_log_std: float = 0.25  # per-channel log gain std: coloured light up to ~x1.6 per channel
    falloff: tuple[float, float] = (0.0, 0.8)
    shadows: tuple[float, float] = (0.0, 0.7)
    p_blur: float = 0.4
    blur_sigma_px: tuple[float, float] = (0.5, 2.5)
    p_motion_blur: float = 0.25
    motion_blur_px: tuple[float, float] = (2.0, 12.0)
    photons_at_gain_1: tuple[float, float] = (200.0, 5000.0)  # log-uniform; divided by 1/gain (darker = noisier)
    read_noise: tuple[float, float] = (0.0, 0.02)
    extra: dict = field(default_factory=dict)  # fixed overrides of `AppearanceChange` fields

    def sample(self, rng: np.random.Generator) -> AppearanceChange:
        gain = _log_uniform(rng, *self.gain)
        params = dict(
            gain=gain,
            gamma=_log_uniform(rng, *self.gamma),
            wb_rgb=tuple(float(g) for g in np.exp(rng.normal(0.0, self.wb_log_std, 3))),
            falloff=float(rng.uniform(*self.falloff)),
            shadows=float(rng.uniform(*self.shadows)),
            n_shadows=int(rng.integers(1, 4)),
            blur_sigma_px=float(rng.uniform(*self.blur_sigma_px)) if rng.random() < self.p_blur else 0.0,
            motion_blur_px=float(rng.uniform(*self.motion_blur_px)) if rng.random() < self.p_motion_blur else 0.0,
            # A darker scene means fewer photons: the same sensor gets noisier.
            photons=_log_uniform(rng, *self.photons_at_gain_1) * min(gain, 1.0),
            read_noise=float(rng.uniform(*self.read_noise)),
        )
        params.update(self.extra)
        return AppearanceChange(**params)

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.sample(rng).apply(image, rng)


PRESETS: dict[str, AppearanceChange | AppearanceRange] = {
    "none": AppearanceChange(),
    "darker": AppearanceChange(gain=0.35, photons=400.0, read_noise=0.004),
    "brighter": AppearanceChange(gain=1.8, gamma=0.85),
    "tinted": AppearanceChange(wb_rgb=(1.25, 1.0, 0.7)),  # warm tungsten-like light
    "blurred": AppearanceChange(blur_sigma_px=2.0),
    "shadowed": AppearanceChange(falloff=0.5, shadows=0.5),
    "night": AppearanceChange(gain=0.12, gamma=1.2, wb_rgb=(1.2, 1.0, 0.75), photons=60.0, read_noise=0.01),
    "random_mild": AppearanceRange(gain=(0.4, 1.4), gamma=(0.6, 1.8), wb_log_std=0.08, falloff=(0.0, 0.3),
                                   shadows=(0.0, 0.3), p_blur=0.2, p_motion_blur=0.1),
    "random_strong": AppearanceRange(),
}


def appearance_preset(name: str) -> AppearanceChange | AppearanceRange:
    """A named change: one of ``PRESETS``."""
    if name not in PRESETS:
        raise ValueError(f"unknown appearance preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]
