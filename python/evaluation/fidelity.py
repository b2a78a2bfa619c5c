"""Fidelity of generated images, beside the judge's accuracy: do they look like the data, object by object?

Feature space: the second judge's penultimate layer (weights/judge2, a VGG-style CNN trained on its own renders;
256 features after global average pooling). No generator is trained against it and no selection reads it (the
class terms and best-of-N use the latent and pixel classifiers, trained on real latents only). It is a network
trained to tell objects apart, not an ImageNet one (none can be downloaded here, and ImageNet features say little
about 64x64 CLEVR scenes).

Distribution figures, from the features, computed by torch-fidelity (the library's own maths, fed our features):
- fd: Frechet distance between Gaussian fits of the real and generated features. Biased upward for small sets
  (the bias falls like 1/N); below ~1,000 images per side compare KID, not FD.
- kid: kernel inception distance, the unbiased MMD^2 estimate with the cubic polynomial kernel, mean and std over
  random subsets (x 1000 in reports); unbiased at any size, so it is the figure for small sets.
- precision / recall (Kynkaanniemi et al. 2019): the share of generated images inside the real images' k-NN
  manifold (k = 3), and of real images inside the generated images' one.

Object figures, per image, with the primary judge (p > 0.5) and in pixels:
- unrequested: images with an object that was not asked for; missing: requested objects the judge does not see.
- contrast: mean colour distance of each pixel from its row's median (the floor runs in horizontal bands, objects
  are a minority of a row): faded and ghosted objects lower it. Reported as a ratio to the real renders'.
- sharpness: the strength of an image's strongest edges (the mean of its top 2% gradient magnitudes; the floor's
  smooth gradient is the other 98%): soft, blurred and doubled edges lower it. A ratio to the real renders' too.
- counted_surplus / counted_deficit / counted_excess_mean (where weights/counter exists, python/models/counter.py):
  the judges name classes and cannot count, so a requested object drawn twice or a faint ghost passes them; the
  evaluation's object counter (a CNN on images, trained on renders in which a class may repeat, nothing trained
  against it) reads how many objects each image holds: the share of images with more objects than requested, with
  fewer, and the mean difference.

Every figure is reported beside its floors: a second set of real renders of the same conditions (real vs real)
and the VAE's reconstructions of that set (the best any generator in this latent space can do).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from python.core.images import to_uint8
from python.data.dataset import cache_dir, to_model_range
from python.data.synthetic import render_conditions
from python.evaluation.metrics import object_rates
from python.models.counter import count_figures
from python.models.judge import judge_features
from python.models.vae import VAE, reconstruct

FEATURES = "second judge's penultimate layer (256-d)"
RELIABLE_FD = 1000  # images per side below which FD is biased enough that KID is the figure to read
MIN_IMAGES = 8  # fewer, and the k-NN manifolds (k = 3) and KID subsets say nothing


def distribution_figures(real: torch.Tensor, fake: torch.Tensor, kid_subsets: int = 100, seed: int = 0) -> dict:
    """FD, KID (mean and std over subsets) and precision / recall between two feature sets (N, d)."""
    real, fake = real.double(), fake.double()
    n = min(len(real), len(fake))
    subset = min(1000, max(n // 2, 2))
    fd = fid_statistics_to_metric(fid_features_to_statistics(real), fid_features_to_statistics(fake), verbose=False)
    kid = kid_features_to_metric(fake, real, kid_subsets=kid_subsets, kid_subset_size=subset, rng_seed=seed,
                                 verbose=False)
    prc = prc_features_to_metric(fake, real, verbose=False)
    return {"n_real": len(real), "n_generated": len(fake), "fd": fd["frechet_inception_distance"],
            "fd_reliable": n >= RELIABLE_FD, "kid_x1000": 1000 * kid["kernel_inception_distance_mean"],
            "kid_std_x1000": 1000 * kid["kernel_inception_distance_std"], "kid_subset": subset,
            "precision": prc["precision"], "recall": prc["recall"]}


def contrast(images) -> np.ndarray:
    """Per image: the mean distance (0-255 RGB units) of each pixel from the median of its row."""
    x = to_uint8(images).astype(np.float32)  # (N, H, W, 3)
    return np.linalg.norm(x - np.median(x, axis=2, keepdims=True), axis=-1).mean((1, 2))


def sharpness(images, top: float = 0.02) -> np.ndarray:
    """Per image: the mean of the largest `top` share of its gradient magnitudes (0-255 RGB units per pixel)."""
    x = to_uint8(images).astype(np.float32)
    grad = np.sqrt((np.diff(x, axis=1)[:, :, :-1] ** 2 + np.diff(x, axis=2)[:, :-1] ** 2).sum(-1))
    flat = np.sort(grad.reshape(len(x), -1), axis=1)
    return flat[:, -max(1, int(top * flat.shape[1])):].mean(1)


class Reference:
    """Real renders of a condition list (two disjoint sets: `real` is the reference, `other` the real-vs-real
    floor) with the networks that read them; figures(images) scores generated images for the same conditions, in
    the same order, against the reference."""

    def __init__(self, real_u8: np.ndarray, other_u8: np.ndarray, labels: np.ndarray, feature_net, judge,
                 vae: VAE | None = None, counter=None):
        self.labels, self.feature_net, self.judge, self.counter = labels, feature_net, judge, counter
        real = to_model_range(real_u8)
        self.real_features = judge_features(feature_net, real)
        self.real_contrast, self.real_sharpness = float(contrast(real).mean()), float(sharpness(real).mean())
        self.floors = {"real_vs_real": self.figures(to_model_range(other_u8))}
        if vae is not None:
            self.floors["vae_reconstruction"] = self.figures(reconstruct(vae, other_u8))

    def figures(self, images: torch.Tensor) -> dict:
        if len(images) != len(self.labels):
            raise ValueError(f"{len(images)} images for {len(self.labels)} reference conditions")
        out = distribution_figures(self.real_features, judge_features(self.feature_net, images))
        out["contrast_ratio"] = float(contrast(images).mean()) / self.real_contrast
        out["sharpness_ratio"] = float(sharpness(images).mean()) / self.real_sharpness
        out.update(object_rates(self.judge, images, self.labels))
        if self.counter is not None:
            out.update(count_figures(self.counter, images, self.labels))
        return out


def reference_renders(data: Path, name: str, cond: np.ndarray, seed: int) -> np.ndarray:
    """One fresh render per condition (python.data.synthetic.render_conditions, its own random stream), cached in
    the dataset's cache folder by the condition list and the seed: the real images of a condition file."""
    key = hashlib.sha1(np.ascontiguousarray(cond, np.float32).tobytes()).hexdigest()[:12]
    path = cache_dir(Path(data)) / f"reference-{Path(name).stem}-{key}-seed{seed}.npy"
    if path.exists():
        return np.load(path)
    images = render_conditions(cond, 1, seed=seed)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, images)
    os.replace(tmp, path)
    return images


def load_reference(data: Path, name: str, cond: np.ndarray, feature_net, judge, vae: VAE | None = None,
                   counter=None) -> Reference:
    """The Reference of a condition file: renders with seeds 0 (the reference) and 1 (the real-vs-real floor)."""
    if len(cond) < MIN_IMAGES:
        raise ValueError(f"{name}: {len(cond)} conditions; fidelity figures need at least {MIN_IMAGES}")
    return Reference(reference_renders(data, name, cond, 0), reference_renders(data, name, cond, 1), cond,
                     feature_net, judge, vae, counter)
