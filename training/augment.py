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
* ``"domain"`` (the generalisation recipe, docs/validation.md): what ``strong`` does with
  wider ranges (gamma [0.5, 2], contrast x[0.7, 1.3], brightness +-0.3, noise up to 0.15),
  plus the contrasts this project meets but its cases do not all show: inversion with
  p = 0.2 (a T2w patch looks T1w-like and vice versa: bright fluid becomes dark), a smooth
  multiplicative bias field with p = 0.5 (coil shading, strongest on water-fat images) and a
  Gaussian blur with p = 0.2 (sigma 0.5-1.5 px).
* ``"remap"``: ``domain`` plus, with p = 0.5, a random *non-monotone* intensity curve (a
  piecewise-linear lookup through 6 random knots over the patch's range, blended with the
  identity by a random weight). Inversion only flips the order of the tissues; a remap also
  reorders them (marrow darker than fat and CSF, or brighter than both), which is how one
  sequence differs from another. The model is left with shapes and edges to go by.
* ``"tissue"``: ``domain`` plus, with p = 0.5, a new contrast for each *labelled* structure of the
  patch: inside a softened copy of its mask the structure's mean moves to a random level of the
  patch's range and its texture is scaled by x[0.5, 2]. A global curve (``remap``) moves every tissue
  of one intensity alike; sequences differ per tissue (marrow is bright on T1w and fat images, grey
  on T2w, dark on water and TIRM images, while discs go the other way), and that is what this draws.
  Only the structure a case annotates moves; its unlabelled neighbours keep the sequence's contrast.
* ``"gin"``: ``domain`` plus, with p = 0.5, a random shallow network's view of the patch (the
  "global intensity non-linear" idea of Ouyang et al., 2022, for single-source domain
  generalisation): four convolutions with fresh random weights (3x3 or 1x1, two channels inside,
  leaky ReLU between), its output given the patch's mean and spread and blended with the patch by
  a random share. Unlike a curve it changes local texture too (edges sharpen, flat tissue gains or
  loses grain), which is another way sequences differ.

Resolution augmentation (``resolution_p`` > 0, also not in the seed): with that probability
a patch is shrunk by a factor in [1.2, 2.2] (area averaging) and brought back (bilinear),
which is what a 1.2-2.2 mm in-plane acquisition looks like after the engine resamples it to
the model's 1 mm plane. The thick-slice counterpart (partial volume across slices) happens in
the sampler (``training.data.PatchSampler``), where the neighbouring slices are at hand.

Augmentation share (``augment_p`` < 1, not in the seed): each patch is augmented at all only with
that probability; the others go in as plain centre crops of the real image. The tenth round
(docs/validation.md) found the two ends pulling apart: without augmentation a fine-tune fits the
known sources far better, while the contrast randomisation is what a never-seen source needs. A
share mixes both kinds of step in every batch instead of running them one after the other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import INTENSITY_MODES
from .data import IGNORE_INDEX


_INTENSITY = {"light": {"contrast": 0.1, "brightness": 0.1, "gamma": 1.0, "noise": (0.05, 0.05)},
              "strong": {"contrast": 0.25, "brightness": 0.25, "gamma": 1.6, "noise": (0.0, 0.1)},
              "domain": {"contrast": 0.3, "brightness": 0.3, "gamma": 2.0, "noise": (0.0, 0.15),
                         "invert_p": 0.2, "bias_p": 0.5, "bias_amp": 0.35, "blur_p": 0.2, "blur": (0.5, 1.5)}}
_INTENSITY["remap"] = {**_INTENSITY["domain"], "remap_p": 0.5}
_INTENSITY["tissue"] = {**_INTENSITY["domain"], "tissue_p": 0.5}
_INTENSITY["gin"] = {**_INTENSITY["domain"], "gin_p": 0.5}
GIN_LAYERS, GIN_CHANNELS = 4, 2
TISSUE_SCALE = 2.0  # texture scaled by a factor in [1/TISSUE_SCALE, TISSUE_SCALE] (log-uniform)
TISSUE_EDGE_PX = 1.0  # sigma of the Gaussian that softens a structure's mask
REMAP_KNOTS = 6
RESOLUTION_FACTORS = (1.2, 2.2)


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True
    rotation_deg: float = 20.0
    zoom: tuple[float, float] = (0.5, 1.5)
    flip_p: float = 0.5
    shift: float = 0.10
    intensity: str = "off"  # one of INTENSITY_MODES (True/False are read as light/off)
    resolution_p: float = 0.0  # probability of the low-resolution round trip
    augment_p: float = 1.0  # share of patches augmented at all (the rest: plain centre crops)

    def __post_init__(self):
        if not 0 <= self.augment_p <= 1:
            raise ValueError(f"augment_p is a probability in [0, 1], got {self.augment_p}")
        v = {True: "light", False: "off", None: "off"}.get(self.intensity, self.intensity)
        if v not in INTENSITY_MODES:
            raise ValueError(f"intensity augmentation must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        object.__setattr__(self, "intensity", v)

    def to_dict(self) -> dict:
        return {"enabled": self.enabled, "rotation_deg": self.rotation_deg, "zoom": list(self.zoom),
                "flip_p": self.flip_p, "shift": self.shift, "intensity": self.intensity,
                "resolution_p": self.resolution_p, "augment_p": self.augment_p}


def random_params(n: int, cfg: AugmentConfig, gen: torch.Generator) -> dict:
    """Per-sample transform parameters (CPU tensors)."""
    u = lambda: torch.rand(n, generator=gen, dtype=torch.float64)  # noqa: E731
    z = torch.zeros(n, dtype=torch.float64)
    neutral = {"contrast": z + 1, "brightness": z, "gamma": z + 1, "noise": z, "invert": torch.zeros(n, dtype=torch.bool),
               "bias": z, "blur": z, "resolution": z + 1, "remap": z,
               "tissue": torch.zeros(n, dtype=torch.bool), "gin": z}
    # the parameters of a plain centre crop: no augmentation at all, or a patch outside the share
    untouched = {"angle": z, "zoom": z + 1, "flip": torch.zeros(n, dtype=torch.bool), "ty": z, "tx": z, **neutral}
    if not cfg.enabled:
        return untouched
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
        if "invert_p" in k:
            out["invert"] = u() < k["invert_p"]
            out["bias"] = torch.where(u() < k["bias_p"], (u() * 2 - 1) * k["bias_amp"], z)
            b0, b1 = k["blur"]
            out["blur"] = torch.where(u() < k["blur_p"], b0 + u() * (b1 - b0), z)
        if "remap_p" in k:
            # weight of the random curve (0 = identity); the knots themselves are drawn in intensity()
            out["remap"] = torch.where(u() < k["remap_p"], 0.5 + 0.5 * u(), z)
        if "tissue_p" in k:
            out["tissue"] = u() < k["tissue_p"]  # the levels themselves are drawn in intensity()
        if "gin_p" in k:
            # share of the random network's image (0 = untouched); its weights are drawn in intensity()
            out["gin"] = torch.where(u() < k["gin_p"], u(), z)
    if cfg.resolution_p > 0:
        f0, f1 = RESOLUTION_FACTORS
        out["resolution"] = torch.where(u() < cfg.resolution_p, f0 + u() * (f1 - f0), z + 1)
    if cfg.augment_p < 1:
        # drawn last, so a share of 1 leaves every earlier draw (and so every earlier run) as it was
        plain = u() >= cfg.augment_p
        out = {k: torch.where(plain, untouched[k], v) for k, v in out.items()}
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
    """Resample ``image [B,N,C,C]`` (bilinear; N = 1, or the slices of a 2.5D sample, moved alike)
    and ``label [B,C,C]`` (nearest) to ``patch``.

    Returns ``(image [B,N,P,P] float32, label [B,P,P] int64)`` on ``image``'s device.
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
        img = intensity(img, params, noise_gen, label=lab)
    return img, lab


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of one ``[1, C, H, W]`` sample, each channel alike (reflect padding)."""
    if img.shape[1] > 1:  # the channels of a 2.5D sample: blurred as a batch of one-channel images
        return _gaussian_blur(img.transpose(0, 1), sigma).transpose(0, 1)
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32, device=img.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    img = F.conv2d(F.pad(img, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(img, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def _bias_field(shape, amp: torch.Tensor, gen: torch.Generator, device) -> torch.Tensor:
    """Smooth multiplicative fields ``exp(amp * s)``, ``s`` a bicubic upsampling of 4x4 noise in [-1, 1]."""
    b, _, h, w = shape
    coarse = torch.rand(b, 1, 4, 4, generator=gen) * 2 - 1
    s = F.interpolate(coarse.to(device), size=(h, w), mode="bicubic", align_corners=True)
    return torch.exp(amp.to(device=device, dtype=torch.float32)[:, None, None, None] * s)


def degrade_resolution(img: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per-sample low-resolution round trip: area-shrink by ``factors[i]`` (>1), bilinear back."""
    if not bool((factors > 1).any()):
        return img
    h, w = img.shape[-2:]
    out = img.clone()
    for i in torch.nonzero(factors > 1).flatten().tolist():
        f = float(factors[i])
        small = F.interpolate(img[i:i + 1], size=(max(8, round(h / f)), max(8, round(w / f))), mode="area")
        out[i:i + 1] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return out


def _sample_range(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's minimum and (positive) intensity span, ``[B, 1, 1, 1]`` each."""
    lo = img.amin(dim=(1, 2, 3), keepdim=True)
    return lo, (img.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp(min=1e-6)


def random_remap(img: torch.Tensor, weight: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per sample, ``(1 - w) * t + w * curve(t)`` on ``t``, the intensity scaled to [0, 1] over the
    sample's range; ``curve`` is piecewise linear through ``REMAP_KNOTS`` equally spaced knots with
    random heights in [0, 1]. Samples with ``w == 0`` are returned unchanged."""
    b = img.shape[0]
    knots = torch.rand(b, REMAP_KNOTS, generator=gen).to(img.device)
    lo, span = _sample_range(img)
    t = ((img - lo) / span).clamp(0, 1)
    pos = t * (REMAP_KNOTS - 1)
    i0 = pos.floor().clamp(max=REMAP_KNOTS - 2).long()
    frac = pos - i0
    y0 = torch.gather(knots, 1, i0.view(b, -1)).view_as(t)
    y1 = torch.gather(knots, 1, (i0 + 1).view(b, -1)).view_as(t)
    curve = y0 + (y1 - y0) * frac
    w = weight.to(device=img.device, dtype=torch.float32)[:, None, None, None]
    return torch.where(w > 0, ((1 - w) * t + w * curve) * span + lo, img)


def tissue_contrast(img: torch.Tensor, label: torch.Tensor, picked: torch.Tensor,
                    gen: torch.Generator) -> torch.Tensor:
    """Give each labelled structure of the ``picked`` samples a contrast of its own.

    For every class ``c`` in a picked sample's ``label [B,P,P]`` (not background, not ignore):
    ``new = level + k * (img - mean_c)`` with ``level`` uniform over the sample's intensity range and
    ``k`` log-uniform in [1/TISSUE_SCALE, TISSUE_SCALE], blended in through the class mask blurred by
    ``TISSUE_EDGE_PX`` (a hard step exactly on the label's border would be a cue real images lack).
    The draws come from ``gen`` in a fixed order, so a run is reproducible. Other samples are returned
    unchanged."""
    if not bool(picked.any()):
        return img
    out = img.clone()
    lo, span = _sample_range(img)
    for i in torch.nonzero(picked).flatten().tolist():
        classes = [int(c) for c in torch.unique(label[i]).tolist() if c not in (0, IGNORE_INDEX)]
        for c in classes:
            u = torch.rand(2, generator=gen, dtype=torch.float64)
            mask = (label[i] == c).to(img.dtype)[None, None]
            soft = _gaussian_blur(mask, TISSUE_EDGE_PX)[0]  # [1, P, P], shared by the 2.5D channels
            mean = (out[i] * mask[0]).sum(dim=(1, 2), keepdim=True) / mask.sum()
            level = lo[i] + float(u[0]) * span[i]
            k = math.exp((float(u[1]) * 2 - 1) * math.log(TISSUE_SCALE))
            new = level + k * (out[i] - mean)
            out[i] = out[i] + soft * (new - out[i])
    return out


def random_network(img: torch.Tensor, share: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per sample with ``share > 0``: ``(1 - s) * x + s * g(x)``, ``g`` a stack of ``GIN_LAYERS``
    convolutions with standard-normal weights drawn from ``gen`` (kernel 3 or 1 at random, leaky ReLU
    between, ``GIN_CHANNELS`` inside, the input's channel count out), its output shifted and scaled
    to the sample's mean and standard deviation so the blend stays in the patch's range."""
    if not bool((share > 0).any()):
        return img
    out = img.clone()
    c = img.shape[1]
    for i in torch.nonzero(share > 0).flatten().tolist():
        x = img[i:i + 1]
        y = x
        for layer in range(GIN_LAYERS):
            cin = c if layer == 0 else GIN_CHANNELS
            cout = c if layer == GIN_LAYERS - 1 else GIN_CHANNELS
            k = 3 if float(torch.rand(1, generator=gen)) < 0.5 else 1
            w = torch.randn(cout, cin, k, k, generator=gen).to(img.device)
            b = torch.randn(cout, generator=gen).to(img.device) * 0.1
            y = F.conv2d(F.pad(y, (k // 2,) * 4, mode="reflect") if k > 1 else y, w, b)
            if layer < GIN_LAYERS - 1:
                y = F.leaky_relu(y, 0.2)
        y = (y - y.mean()) / y.std().clamp(min=1e-6) * x.std() + x.mean()
        s = float(share[i])
        out[i:i + 1] = (1 - s) * x + s * y
    return out


def intensity(img: torch.Tensor, p: dict, gen: torch.Generator | None = None,
              label: torch.Tensor | None = None) -> torch.Tensor:
    """Per-structure contrast (needs ``label``), resolution, inversion, random network, bias field,
    random remap, gamma over each sample's intensity range, blur, contrast/brightness, noise (each a
    no-op where its parameter is neutral)."""
    dev = img.device
    col = lambda k: p[k].to(device=dev, dtype=torch.float32)[:, None, None, None]  # noqa: E731
    if "tissue" in p and gen is not None and label is not None and bool(p["tissue"].any()):
        img = tissue_contrast(img, label.to(dev), p["tissue"].to(dev), gen)
    if "resolution" in p:
        img = degrade_resolution(img, p["resolution"])
    if "invert" in p and bool(p["invert"].any()):
        img = torch.where(p["invert"].to(dev)[:, None, None, None], -img, img)
    if "gin" in p and gen is not None and bool((p["gin"] > 0).any()):
        img = random_network(img, p["gin"], gen)
    if "bias" in p and gen is not None and bool((p["bias"] != 0).any()):
        # multiplicative around the patch minimum so the background stays background
        lo = img.amin(dim=(1, 2, 3), keepdim=True)
        img = (img - lo) * _bias_field(img.shape, p["bias"], gen, dev) + lo
    if "remap" in p and gen is not None and bool((p["remap"] > 0).any()):
        img = random_remap(img, p["remap"], gen)
    if "gamma" in p and not bool((p["gamma"] == 1).all()):
        lo, span = _sample_range(img)
        img = ((img - lo) / span).clamp(0, 1).pow(col("gamma")) * span + lo
    if "blur" in p and bool((p["blur"] > 0).any()):
        img = img.clone()
        for i in torch.nonzero(p["blur"] > 0).flatten().tolist():
            img[i:i + 1] = _gaussian_blur(img[i:i + 1], float(p["blur"][i]))
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
    randomised = cfg.enabled and (cfg.intensity != "off" or cfg.resolution_p > 0)
    return apply(image.to(device, non_blocking=True), label.to(device, non_blocking=True), theta, patch,
                 params=p, noise_gen=gen if randomised else None)
