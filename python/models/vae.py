"""The autoencoder whose latent space the LDM and the GAN live in.

Two architectures, chosen by measurement (see the README's VAE table):
- "gdn": compressai-style analysis/synthesis transforms (strided convolutions with GDN / inverse GDN
  nonlinearities, Balle et al.), a KL-regularised Gaussian posterior on top. Cheap to decode.
- "kl": a small diffusers AutoencoderKL (ResNet blocks, group norm, mid-block attention).

Both expose encode(x) -> (mean, logvar) and decode(z) -> x for x in [-1, 1] and z unscaled;
`scale_factor` (1 / std of the training latents, computed after training) maps latents to unit
variance for the generators: z_gen = scale_factor * z.
A model is saved as a folder: config.json (architecture + scale_factor) and vae.safetensors.
"""
from __future__ import annotations

import copy
import hashlib
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from python.core.errors import UserError
from python.data.dataset import to_model_range
from python.models.weights import SHIPPED, load_state_into, read_config, read_state, save_weights

SHIPPED_VAE = SHIPPED / "vae"


@dataclass
class VAEConfig:
    arch: str = "gdn"  # "gdn" | "kl"
    latent_channels: int = 4
    downsample: int = 4  # spatial factor: 64x64 -> 16x16
    channels: list[int] = field(default_factory=lambda: [64, 48])  # gdn: widths from the latent side outwards
    kl_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # kl: diffusers block_out_channels
    scale_factor: float = 1.0
    decoder_channels: list[int] | None = None  # gdn: synthesis widths when they differ from the analysis's
    decoder_up: str = "transpose"  # gdn: "transpose" (5x5 stride-2 transposed conv) or "nearest" (+ 3x3 conv)

    def __post_init__(self):
        if self.arch not in ("gdn", "kl"):
            raise UserError(f"VAE arch {self.arch!r} unknown; valid: gdn, kl")
        if self.decoder_up not in ("transpose", "nearest"):
            raise UserError(f"VAE decoder_up {self.decoder_up!r} unknown; valid: transpose, nearest")
        if self.downsample not in (2, 4, 8) or self.latent_channels < 1:
            raise UserError(f"VAE downsample must be 2, 4 or 8 and latent_channels >= 1 "
                            f"(got {self.downsample}, {self.latent_channels})")

    @property
    def stages(self) -> int:
        return int(math.log2(self.downsample))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, 64 // self.downsample, 64 // self.downsample)


def _gdn_class():
    """compressai's GDN; importing compressai warns about torch.jit.script, which is not ours to fix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from compressai.layers import GDN
    return GDN


class GDNAutoencoder(nn.Module):
    """Analysis: [conv5x5/2 -> GDN -> conv3x3 -> GDN] per stage, then a 3x3 conv to (mean, logvar).
    Synthesis mirrors it with inverse GDN and transposed convolutions."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        GDN = _gdn_class()
        c = cfg.latent_channels
        widths = [cfg.channels[min(i, len(cfg.channels) - 1)] for i in range(cfg.stages)]  # latent side first
        enc, cin = [], 3
        for w in reversed(widths):
            enc += [nn.Conv2d(cin, w, 5, 2, 2), GDN(w), nn.Conv2d(w, w, 3, 1, 1), GDN(w)]
            cin = w
        enc.append(nn.Conv2d(cin, 2 * c, 3, 1, 1))
        self.encoder = nn.Sequential(*enc)
        dw = cfg.decoder_channels or cfg.channels
        widths = [dw[min(i, len(dw) - 1)] for i in range(cfg.stages)]
        dec = [nn.Conv2d(c, widths[0], 3, 1, 1), GDN(widths[0], inverse=True)]
        for i, w in enumerate(widths):
            out = widths[i + 1] if i + 1 < len(widths) else None
            if cfg.decoder_up == "transpose":
                dec += [nn.ConvTranspose2d(w, out or 3, 5, 2, 2, output_padding=1)]
            else:  # resize-then-convolve: no checkerboard from uneven kernel overlap
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w, out or 3, 3, 1, 1)]
            if out:
                dec += [GDN(out, inverse=True), nn.Conv2d(out, out, 3, 1, 1), GDN(out, inverse=True)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x):
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def decode(self, z):
        return self.decoder(z)


class DiffusersKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        from diffusers import AutoencoderKL

        chans = tuple(cfg.kl_channels[: cfg.stages + 1])
        self.ae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=chans,
                                down_block_types=("DownEncoderBlock2D",) * len(chans),
                                up_block_types=("UpDecoderBlock2D",) * len(chans), layers_per_block=1,
                                latent_channels=cfg.latent_channels, norm_num_groups=min(16, math.gcd(*chans)),
                                sample_size=64)

    def encode(self, x):
        moments = self.ae.quant_conv(self.ae.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def decode(self, z):
        return self.ae.decoder(self.ae.post_quant_conv(z))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.net = GDNAutoencoder(cfg) if cfg.arch == "gdn" else DiffusersKL(cfg)

    def encode(self, x):
        return self.net.encode(x)

    def decode(self, z):
        return self.net.decode(z)

    def forward(self, x, sample: bool = True):
        mean, logvar = self.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return self.decode(z), mean, logvar


class FrozenGDN(nn.Module):
    """GDN / inverse GDN with its reparametrised beta and gamma evaluated once: plain ops that export to
    ONNX and TorchScript (compressai's lower-bound reparametrisation is a custom autograd function)."""

    def __init__(self, gdn: nn.Module):
        super().__init__()
        with torch.no_grad():
            c = gdn.beta.numel()
            self.register_buffer("beta", gdn.beta_reparam(gdn.beta).detach().clone())
            self.register_buffer("gamma", gdn.gamma_reparam(gdn.gamma).detach().reshape(c, c, 1, 1).clone())
        self.inverse = gdn.inverse

    def forward(self, x):
        norm = torch.nn.functional.conv2d(x * x, self.gamma, self.beta)
        return x * (torch.sqrt(norm) if self.inverse else torch.rsqrt(norm))


class Decoder(nn.Module):
    """Generator-space latents (unit variance) -> images in [-1, 1], for inference and export: the VAE's
    decoder with GDN frozen, the 1/scale_factor folded in front, the output clamped."""

    def __init__(self, vae: VAE):
        super().__init__()
        GDN = _gdn_class()
        self.scale = float(vae.cfg.scale_factor)
        self.net = copy.deepcopy(vae.net).eval()
        for name, mod in list(self.net.named_modules()):
            if isinstance(mod, GDN):
                parent = self.net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.net
                setattr(parent, name.rsplit(".", 1)[-1], FrozenGDN(mod))
        self.requires_grad_(False)
        self.to(memory_format=torch.channels_last)  # measured 1.65x faster convolutions on this CPU (oneDNN)

    def forward(self, z):
        z = (z * (1.0 / self.scale)).contiguous(memory_format=torch.channels_last)
        return self.net.decode(z).clamp(-1, 1).contiguous()


def save_vae(vae: VAE, folder: Path, half: bool = False) -> None:
    save_weights(folder, vae, "vae.safetensors", asdict(vae.cfg), half)


def load_vae_config(folder: Path | None = None) -> VAEConfig:
    folder = Path(folder) if folder else SHIPPED_VAE
    cfg = read_config(folder, "vae.safetensors", "VAE", "python -m python.train_vae")
    try:
        return VAEConfig(**{k: v for k, v in cfg.items() if k != "sha256"})  # the file checksum, not the shape
    except TypeError as e:
        raise UserError(f"{folder / 'config.json'}: not a VAE config ({e})") from None


def load_vae(folder: Path | None = None, device="cpu") -> VAE:
    folder = Path(folder) if folder else SHIPPED_VAE
    return load_state_into(VAE(load_vae_config(folder)), folder / "vae.safetensors").to(device).eval()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


@torch.no_grad()
def reconstruct(vae: VAE, images_u8: np.ndarray, batch: int = 256) -> torch.Tensor:
    """uint8 images (N, 64, 64, 3) -> their reconstructions through the posterior means, in [-1, 1]."""
    out = []
    for i in range(0, len(images_u8), batch):
        x = to_model_range(images_u8[i:i + batch])
        out.append(vae.decode(vae.encode(x)[0]).clamp(-1, 1))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- the latent space

ENCODER_KEYS = ("net.encoder.", "net.ae.encoder.", "net.ae.quant_conv.")


def vae_digest(folder: Path) -> str:
    """Checksum of the latent space the generators see: the encoder's weights and the scale factor, not the
    decoder's. Generators trained on latents stay valid when only the decoder is retrained (a sharper decoder
    for the same latents), and are refused against a VAE with another encoder or scale."""
    return _encoder_hash(Path(folder), with_scale=True)


def encoder_digest(folder: Path) -> str:
    """Checksum of the encoder alone: the key of the (unscaled) latent cache, which the scale factor,
    computed from that cache, must not change."""
    return _encoder_hash(Path(folder), with_scale=False)


def _encoder_hash(folder: Path, with_scale: bool) -> str:
    cfg = load_vae_config(folder)
    h = hashlib.sha1(f"{cfg.arch}/{cfg.latent_channels}".encode())
    if with_scale:
        h.update(f"/{cfg.scale_factor:.6g}".encode())
    state = read_state(folder / "vae.safetensors")
    for k in sorted(k for k in state if k.startswith(ENCODER_KEYS)):
        h.update(k.encode())
        h.update(state[k].half().numpy().tobytes())
    return h.hexdigest()[:12]


def require_latent_space(generator_dir: Path, cfg: dict, vae_dir: Path) -> None:
    """UserError unless a network's saved config (its 'vae_sha') matches the latent space of vae_dir."""
    digest = vae_digest(vae_dir)
    if cfg.get("vae_sha") not in (None, digest):
        raise UserError(f"{generator_dir}: trained on VAE {cfg['vae_sha']} but {vae_dir} holds VAE {digest} (another "
                        f"latent space); use the VAE it was trained with, from one weights folder")
