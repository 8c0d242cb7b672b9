"""Geometric augmentation of a whole batch in one ``affine_grid`` + ``grid_sample`` on the device.

The seed's augmentation: rotation within +-20 degrees, zoom 0.5-1.5, horizontal
flip with probability 1/2 and a shift of at most 10 % of the patch per axis. One
random affine per sample is drawn (on the CPU, from the epoch's generator, so runs
are reproducible on any device) and applied to image and label with the *same*
sampling grid: bilinear for the image, nearest for the label, so they stay aligned
and the label stays integer-valued.

The input is the sampler's context crop (twice the patch size, centred on the
patch centre); the output is the ``patch x patch`` window. Zoom ``z`` > 1 magnifies
(the window covers ``patch / z`` source pixels), ``z`` < 1 shrinks, drawing on the
surrounding context. Without augmentation the transform is an exact centre crop.

Optional intensity augmentation (not in the seed, off by default), on the z-scored image:

* ``"light"``: per-sample contrast x[0.9, 1.1], brightness +-0.1, Gaussian noise sigma 0.05;
* ``"strong"`` (domain randomisation, so a model cannot tell which data set - and hence
  which partial annotation - a patch comes from): a gamma curve with gamma in
  [0.6, 1.6] over the patch's intensity range, contrast x[0.75, 1.25], brightness
  +-0.25, Gaussian noise with sigma uniform in [0, 0.1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


INTENSITY_MODES = ("off", "light", "strong")
_INTENSITY = {"light": {"contrast": 0.1, "brightness": 0.1, "gamma": 1.0, "noise": (0.05, 0.05)},
              "strong": {"contrast": 0.25, "brightness": 0.25, "gamma": 1.6, "noise": (0.0, 0.1)}}


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True
    rotation_deg: float = 20.0
    zoom: tuple[float, float] = (0.5, 1.5)
    flip_p: float = 0.5
    shift: float = 0.10
    intensity: str = "off"  # "off" | "light" | "strong" (True/False are read as light/off)

    def __post_init__(self):
        v = {True: "light", False: "off", None: "off"}.get(self.intensity, self.intensity)
        if v not in INTENSITY_MODES:
            raise ValueError(f"intensity augmentation must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        object.__setattr__(self, "intensity", v)

    def to_dict(self) -> dict:
        return {"enabled": self.enabled, "rotation_deg": self.rotation_deg, "zoom": list(self.zoom),
                "flip_p": self.flip_p, "shift": self.shift, "intensity": self.intensity}


def random_params(n: int, cfg: AugmentConfig, gen: torch.Generator) -> dict:
    """Per-sample transform parameters (CPU tensors)."""
    u = lambda: torch.rand(n, generator=gen, dtype=torch.float64)  # noqa: E731
    z = torch.zeros(n, dtype=torch.float64)
    neutral = {"contrast": z + 1, "brightness": z, "gamma": z + 1, "noise": z}
    if not cfg.enabled:
        return {"angle": z, "zoom": z + 1, "flip": torch.zeros(n, dtype=torch.bool), "ty": z, "tx": z, **neutral}
    angle = (u() * 2 - 1) * math.radians(cfg.rotation_deg)
    zoom = cfg.zoom[0] + u() * (cfg.zoom[1] - cfg.zoom[0])
    flip = u() < cfg.flip_p
    ty, tx = (u() * 2 - 1) * cfg.shift, (u() * 2 - 1) * cfg.shift
    out = {"angle": angle, "zoom": zoom, "flip": flip, "ty": ty, "tx": tx, **neutral}
    if cfg.intensity != "off":
        k = _INTENSITY[cfg.intensity]
        out["contrast"] = 1 + (u() * 2 - 1) * k["contrast"]
        out["brightness"] = (u() * 2 - 1) * k["brightness"]
        if k["gamma"] > 1:
            out["gamma"] = torch.exp((u() * 2 - 1) * math.log(k["gamma"]))
        lo, hi = k["noise"]
        out["noise"] = lo + u() * (hi - lo)
    return out


def theta_from_params(p: dict, crop: int, patch: int) -> torch.Tensor:
    """``[B, 2, 3]`` affine mapping output (patch) normalised coordinates to input (crop) ones."""
    r = patch / crop  # the patch spans this fraction of the crop at zoom 1
    cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
    fx = torch.where(p["flip"], -1.0, 1.0).to(torch.float64)
    s = r / p["zoom"]
    theta = torch.zeros(len(cos), 2, 3, dtype=torch.float64)
    # x_in = s * R @ (fx * x_out, y_out) + shift; normalised units: 1 = half the crop
    theta[:, 0, 0] = s * cos * fx
    theta[:, 0, 1] = -s * sin
    theta[:, 1, 0] = s * sin * fx
    theta[:, 1, 1] = s * cos
    theta[:, 0, 2] = p["tx"] * 2 * r  # shift as a fraction of the patch
    theta[:, 1, 2] = p["ty"] * 2 * r
    return theta


def apply(image: torch.Tensor, label: torch.Tensor, theta: torch.Tensor, patch: int,
          params: dict | None = None, noise_gen: torch.Generator | None = None):
    """Resample ``image [B,1,C,C]`` (bilinear) and ``label [B,C,C]`` (nearest) to ``patch``.

    Returns ``(image [B,1,P,P] float32, label [B,P,P] int64)`` on ``image``'s device.
    Outside the crop the image is 0 and the label is background. ``params`` may carry
    intensity parameters (gamma, contrast, brightness, noise); noise needs ``noise_gen``.
    """
    dev = image.device
    b = image.shape[0]
    grid = F.affine_grid(theta.to(device=dev, dtype=torch.float32), [b, 1, patch, patch], align_corners=False)
    img = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lab = F.grid_sample(label[:, None].to(device=dev, dtype=torch.float32), grid, mode="nearest",
                        padding_mode="zeros", align_corners=False)
    lab = lab[:, 0].round().long()
    if params is not None:
        img = intensity(img, params, noise_gen)
    return img, lab


def intensity(img: torch.Tensor, p: dict, gen: torch.Generator | None = None) -> torch.Tensor:
    """Gamma over each sample's intensity range, then contrast/brightness, then noise (no-ops when neutral)."""
    dev = img.device
    col = lambda k: p[k].to(device=dev, dtype=torch.float32)[:, None, None, None]  # noqa: E731
    if "gamma" in p and not bool((p["gamma"] == 1).all()):
        lo = img.amin(dim=(1, 2, 3), keepdim=True)
        hi = img.amax(dim=(1, 2, 3), keepdim=True)
        span = (hi - lo).clamp(min=1e-6)
        img = ((img - lo) / span).clamp(0, 1).pow(col("gamma")) * span + lo
    if not (bool((p["contrast"] == 1).all()) and bool((p["brightness"] == 0).all())):
        img = img * col("contrast") + col("brightness")
    if "noise" in p and gen is not None and bool((p["noise"] > 0).any()):
        img = img + col("noise") * torch.randn(img.shape, generator=gen).to(dev)
    return img


def augment_batch(image: torch.Tensor, label: torch.Tensor, cfg: AugmentConfig, patch: int,
                  gen: torch.Generator, device: torch.device | str = "cpu"):
    """Draw parameters from ``gen`` and transform a sampler batch on ``device``."""
    crop = image.shape[-1]
    p = random_params(image.shape[0], cfg, gen)
    theta = theta_from_params(p, crop, patch)
    return apply(image.to(device, non_blocking=True), label.to(device, non_blocking=True), theta, patch,
                 params=p, noise_gen=gen if (cfg.enabled and cfg.intensity != "off") else None)
