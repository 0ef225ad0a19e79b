"""Batch augmentation for ultrasound frames, in torch (runs on the training device).

Spatial (one affine per sample, image bilinear, mask nearest, zero padding = mean intensity and
background): left-right flip, small rotations, isotropic scaling. No up-down flip: depth has a
direction in B-mode (near field on top, acoustic shadows below), so a flipped frame is not a frame
the model will ever see. Intensity (on z-scored images, nnU-Net-like probabilities): brightness,
contrast, gamma, Gaussian noise, Gaussian blur and low-resolution simulation (down with nearest,
back up with bilinear), which imitate gain, dynamic range, probe and depth setting differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (p_*) and ranges of every transform; ``enabled=False`` turns all off."""

    enabled: bool = True
    p_flip_lr: float = 0.5
    p_rotate: float = 0.2
    max_rotation_deg: float = 15.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.8, 1.25)
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.1
    noise_max_variance: float = 0.1
    p_blur: float = 0.2
    blur_sigma_range: tuple[float, float] = (0.5, 1.0)
    p_low_resolution: float = 0.25
    low_resolution_range: tuple[float, float] = (0.5, 1.0)


class Augmenter:
    """``augment(images (B, 1, H, W) float, masks (B, H, W) long) -> (images, masks)``."""

    def __init__(self, config: AugmentConfig, generator: torch.Generator) -> None:
        self.config = config
        self.gen = generator

    def _u(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.gen))

    def _p(self, p: float) -> bool:
        return p > 0 and float(torch.rand((), generator=self.gen)) < p

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.config.enabled:
            return images, masks
        images, masks = self._spatial(images, masks)
        out = [self._intensity(images[b]) for b in range(images.shape[0])]
        return torch.stack(out), masks

    # -- spatial -------------------------------------------------------------------------------
    def _spatial(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        b, _, h, w = images.shape
        thetas = []
        any_warp = False
        flips = []
        for _ in range(b):
            angle = math.radians(self._u(-c.max_rotation_deg, c.max_rotation_deg)) if self._p(c.p_rotate) else 0.0
            zoom = self._u(*c.scale_range) if self._p(c.p_scale) else 1.0
            flips.append(self._p(c.p_flip_lr))
            any_warp |= angle != 0.0 or zoom != 1.0
            thetas.append(_affine(angle, zoom, h, w))
        if any_warp:
            theta = torch.stack(thetas).to(images.device, images.dtype)
            grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
            images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            masks = (
                F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[
                    :, 0
                ]
                .round()
                .long()
            )
        flip = torch.tensor(flips, device=images.device)
        if flip.any():
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
        return images, masks

    # -- intensity -----------------------------------------------------------------------------
    def _intensity(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if self._p(c.p_brightness):
            x = x * self._u(*c.brightness_range)
        if self._p(c.p_contrast):
            lo, hi, mean = x.min(), x.max(), x.mean()
            x = ((x - mean) * self._u(*c.contrast_range) + mean).clamp(lo, hi)
        if self._p(c.p_low_resolution):
            x = _low_resolution(x, self._u(*c.low_resolution_range))
        if self._p(c.p_blur):
            x = _gaussian_blur(x, self._u(*c.blur_sigma_range))
        if self._p(c.p_gamma):
            x = _gamma(x, self._u(*c.gamma_range))
        if self._p(c.p_noise):
            std = math.sqrt(self._u(0.0, c.noise_max_variance))
            x = x + std * torch.randn(x.shape, generator=self.gen, dtype=x.dtype).to(x.device)
        return x


def _affine(angle: float, zoom: float, h: int, w: int) -> torch.Tensor:
    """2x3 theta mapping output to input normalised coords: rotate by ``angle`` and magnify by
    ``zoom`` in pixel space (so non-square frames are not sheared)."""
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    # In pixel space p_in = R p_out / zoom; normalised x = px / (w/2), y = py / (h/2).
    return torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=torch.float32)


def _low_resolution(x: torch.Tensor, factor: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = (max(1, round(h * factor)), max(1, round(w * factor)))
    down = F.interpolate(x[None], size=small, mode="nearest")
    return F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False)[0]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y[0]


def _gamma(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Gamma on the sample's own [min, max] range, mapped back (nnU-Net's retain_stats=False)."""
    lo, hi = x.min(), x.max()
    span = (hi - lo).clamp_min(1e-7)
    return ((x - lo) / span).pow(gamma) * span + lo
