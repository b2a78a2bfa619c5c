"""The latent cache: every training image (and its mirror image) encoded once by the VAE.

LDM and GAN training read latents from here and never run the encoder. The cache stores the
posterior mean and std (float16, unscaled) for each image and for its horizontal flip (a
label-preserving augmentation that is exact only in pixel space, hence encoded rather than
flipped in latent space), with the multi-hot labels. It is keyed by the encoder's checksum and
the dataset's image cache, so a new encoder or changed data rebuilds it (a new decoder does not).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from python.core.errors import UserError
from python.data.dataset import cache_dir, load_split, to_model_range
from python.data.layout import mirror, train_layouts
from python.data.synthetic import render_count_arrays, render_faint_arrays
from python.models.vae import SHIPPED_VAE, VAE, encoder_digest, load_vae


@dataclass
class LatentSet:
    mean: torch.Tensor  # (M, C, h, w) float16, unscaled
    std: torch.Tensor
    labels: torch.Tensor  # (M, 24) float32
    scale_factor: float

    def __len__(self):
        return len(self.mean)

    def to(self, device) -> "LatentSet":
        """The same set on another device (on a GPU the whole cache fits: 36k latents of 16x16x8 are ~150 MB),
        so that drawing a batch costs no host-to-device copy."""
        return LatentSet(self.mean.to(device), self.std.to(device), self.labels.to(device), self.scale_factor)

    def sample(self, idx: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents z ~ q(z|x) for rows idx (on the set's device; gen must live there too): what the
        generators train on (unit variance)."""
        mean, std = self.mean[idx].float(), self.std[idx].float()
        return (mean + std * torch.randn(mean.shape, generator=gen, device=mean.device)) * self.scale_factor


@torch.no_grad()
def encode_images(vae: VAE, images_u8: np.ndarray, batch: int = 256):
    """Posterior (mean, std) as float16 of uint8 images (N, 64, 64, 3) and of their mirror images: all originals,
    then all mirrors (the latent cache's layout)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = vae.to(device)
    means, stds = [], []
    for i in range(0, len(images_u8), batch):
        x = to_model_range(images_u8[i:i + batch]).to(device)
        for view in (x, x.flip(3)):
            mean, logvar = vae.encode(view)
            means.append(mean.half().cpu())
            stds.append((0.5 * logvar).exp().half().cpu())
    # interleaved per batch above; reorder to [all originals, all flips]
    orig = torch.cat(means[0::2]), torch.cat(stds[0::2])
    flip = torch.cat(means[1::2]), torch.cat(stds[1::2])
    return torch.cat([orig[0], flip[0]]), torch.cat([orig[1], flip[1]])


def load_latents(data: Path, vae_folder: Path | None = None, labels_file: str = "train.json") -> LatentSet:
    """The cached latents of a dataset under a VAE, built on first use (a few minutes on 2 cores)."""
    vae_folder = Path(vae_folder) if vae_folder else SHIPPED_VAE
    vae = load_vae(vae_folder)
    split = load_split(data, labels_file)
    key = hashlib.sha1(("".join(split.names) + str(split.images.shape)).encode()).hexdigest()[:12]
    path = cache_dir(Path(data)) / f"latents-{Path(labels_file).stem}-{encoder_digest(vae_folder)}-{key}.npz"
    if not path.exists():
        print(f"encoding {len(split)} images (and their mirror images) into the latent cache {path}", flush=True)
        mean, std = encode_images(vae, split.images)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, mean=mean.numpy(), std=std.numpy(), labels=np.concatenate([split.labels, split.labels]))
        os.replace(tmp, path)
    d = np.load(path)
    return LatentSet(torch.from_numpy(d["mean"]), torch.from_numpy(d["std"]), torch.from_numpy(d["labels"]),
                     vae.cfg.scale_factor)


def with_places(lat: LatentSet, data: Path) -> LatentSet:
    """The set with each latent's condition row widened to a layout model's: its multi-hot, then its objects'
    places (python/data/layout.py; recovered from the renderer for a python.make_data folder, mirrored for the
    mirror-image half of the cache)."""
    half = len(lat) // 2
    places = train_layouts(data, load_split(data).names, lat.labels[:half].numpy())
    return replace(lat, labels=torch.cat([lat.labels, torch.from_numpy(np.concatenate([places, mirror(places)]))], 1))


def _encoded_renders(path: Path, key: str, vae: VAE, render, rendered: str, stored: str, log,
                     keyless_ok: bool = False):
    """The arrays of `path`, first written if missing: render() -> (uint8 images, {name: one row per image}),
    encoded with their mirror images (each row kept twice, as the latent cache holds them) and stored whole, then
    swapped in, beside `key`. A file written under another key is refused (one with no key at all only if
    `keyless_ok`: count files from before the key was kept). `rendered` / `stored` word the log lines."""
    path = Path(path)
    if not path.exists():
        images, rows = render()
        log(rendered.format(n=len(images)))
        mean, std = encode_images(vae, images)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, mean=mean.numpy(), std=std.numpy(), key=key,
                 **{name: np.concatenate([r, r]) for name, r in rows.items()})
        os.replace(tmp, path)
    else:
        log(f"{stored} latents read from {path}")
    d = np.load(path)
    held = str(d["key"]) if "key" in d.files else None
    if held != key and (held is not None or not keyless_ok):
        raise UserError(f"{path} holds the latents of {held or 'renders it does not name'}, not of {key}: move it "
                        "away to render afresh")
    return d


def count_latents(path: Path, scenes: int, seed: int, vae_folder: Path | None = None, workers: int | None = None,
                  log=print) -> LatentSet:
    """Scenes of 1-5 objects in which a class may repeat (the official data never repeats one): `scenes` fresh
    renders (`render_count_arrays`, stream `seed`) encoded by the VAE with their mirror images, as the latent cache
    holds them; `labels` are the per-class counts (0-5, float). Kept at `path` (a run folder's file) so a rerun skips
    the rendering; a file written for other scenes, another seed or another encoder is refused."""
    vae_folder = Path(vae_folder) if vae_folder else SHIPPED_VAE
    vae = load_vae(vae_folder)

    def render():
        images, counts = render_count_arrays(seed, scenes, workers=workers)
        return images, {"counts": counts}
    d = _encoded_renders(path, f"scenes {scenes} seed {seed} encoder {encoder_digest(vae_folder)}", vae, render,
                         f"rendered {{n}} scenes of 1-5 objects (of {scenes}; a scene with no room is skipped)",
                         "rendered scenes'", log, keyless_ok=True)
    return LatentSet(torch.from_numpy(d["mean"]), torch.from_numpy(d["std"]), torch.from_numpy(d["counts"]).float(),
                     vae.cfg.scale_factor)


def faint_latents(path: Path, scenes: int, seed: int, vae_folder: Path | None = None, workers: int | None = None,
                  log=print) -> tuple[LatentSet, torch.Tensor]:
    """Scenes of 0-3 solid objects and one half-transparent one (`render_faint_arrays`, stream `seed`) encoded by
    the VAE with their mirror images, as the latent cache holds them: a LatentSet whose labels are the solid
    objects only, and the faint object's multi-hot (N, 24). Kept at `path` like count_latents' file."""
    vae_folder = Path(vae_folder) if vae_folder else SHIPPED_VAE
    vae = load_vae(vae_folder)

    def render():
        images, solid, faint, _ = render_faint_arrays(seed, scenes, workers=workers)
        return images, {"labels": solid, "faint": faint}
    d = _encoded_renders(path, f"faint scenes {scenes} seed {seed} encoder {encoder_digest(vae_folder)}", vae, render,
                         f"rendered {{n}} scenes with one faint object (of {scenes}; a scene with no room is skipped)",
                         "faint scenes'", log)
    return (LatentSet(torch.from_numpy(d["mean"]), torch.from_numpy(d["std"]), torch.from_numpy(d["labels"]),
                      vae.cfg.scale_factor), torch.from_numpy(d["faint"]))


def mixed_batch(lat: LatentSet, extra: LatentSet | None, n: int, n_extra: int, gen: torch.Generator | None = None):
    """(z0, labels) of a batch of n: n - n_extra rows of `lat` then n_extra of `extra` (e.g. the count scenes, whose
    labels are counts), drawn with `gen` on the sets' device. With no extra rows it draws exactly what a batch of
    `lat` alone always did (runs and their resumes stay bit-identical)."""
    idx = torch.randint(0, len(lat), (n - n_extra,), generator=gen, device=lat.mean.device)
    z0, labels = lat.sample(idx, gen), lat.labels[idx]
    if extra is None or not n_extra:
        return z0, labels
    jdx = torch.randint(0, len(extra), (n_extra,), generator=gen, device=extra.mean.device)
    return torch.cat([z0, extra.sample(jdx, gen)]), torch.cat([labels, extra.labels[jdx]])
