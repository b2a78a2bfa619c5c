"""The conditional latent denoiser: a small diffusion transformer over latent patches.

The latent grid (C x 16 x 16) is cut into p x p patches (tokens). Each block: adaptive layer norm
modulated by the timestep (adaLN-zero, as in DiT), self-attention among patches, cross-attention from
the patches to the label set, and an MLP.

Conditioning that composes: the label set is a multi-hot vector over the 24 classes. With
cond="tokens", each class has a learned token; a patch attends to the tokens of the objects present
(an attention mask built from the multi-hot vector) plus a learned "null" token that is always
present, so the empty set (classifier-free guidance's unconditional pass) is the null token alone.
With cond="sum", the class embeddings of the present objects are summed into the time embedding.
With pooled=True, cond="tokens" does both: the softmax over the present tokens hides how many objects
were asked for, and the pooled embedding (a linear map of the multi-hot vector, zero at initialisation so
that a model without it warm-starts unchanged) tells every block the whole set, its size included.
With token_update=True, the class tokens also read the image: after the patches' cross-attention each token
attends to the patches and is updated (a residual attention and MLP, two-way as in MM-DiT's joint attention or
SAM's mask decoder), so that the next block's patches see tokens that know where, and whether, their object is
being drawn. Without it the tokens are fixed embeddings, and nothing stops two regions from drawing one token (a
requested colour drawn twice, weights/ldm/MODEL_CARD.md). Its output projections start at zero, so a model
without it warm-starts unchanged.
Both take the condition as the multi-hot vector itself, so ONNX export needs no token bookkeeping.
With layout=True a condition row is the multi-hot followed by each class's (u, v, r) (python/data/layout.py): the
network draws one Gaussian blob per present object on the latent grid (24 maps, a class's map zero when it is
absent) and adds their patch embedding (zero at initialisation, so a model without it warm-starts unchanged) to the
patch tokens. The samplers' unconditional pass zeroes the whole row: no objects and no layout.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from python.core.errors import UserError
from python.core.labels import NUM_CLASSES
from python.core.layout import LayoutBank
from python.models.weights import SHIPPED, load_state_into, read_config, save_weights

SHIPPED_LDM = SHIPPED / "ldm"


@dataclass
class DenoiserConfig:
    in_channels: int = 4
    size: int = 16  # latent height = width
    patch: int = 2
    width: int = 192
    depth: int = 8
    heads: int = 4
    mlp_ratio: float = 4.0
    cond: str = "tokens"  # "tokens" | "sum"
    num_classes: int = NUM_CLASSES
    pooled: bool = False  # also add a linear embedding of the whole label set to the time embedding ("tokens")
    token_update: bool = False  # the class tokens attend to the patches after each block but the last ("tokens")
    layout: bool = False  # the condition also carries each object's place (python/data/layout.py), drawn as blobs

    def __post_init__(self):
        if self.cond not in ("tokens", "sum"):
            raise UserError(f"cond must be 'tokens' or 'sum', got {self.cond!r}")
        if self.token_update and self.cond != "tokens":
            raise UserError("token_update needs cond='tokens' (there are no class tokens to update with 'sum')")
        if self.size % self.patch or self.width % self.heads:
            raise UserError(f"size {self.size} must be divisible by patch {self.patch} and width {self.width} by "
                            f"heads {self.heads}")

    @property
    def cond_dim(self) -> int:
        """The width of a condition row: the multi-hot, then (with layout) 3 numbers per class."""
        return self.num_classes * (4 if self.layout else 1)

    @property
    def tokens(self) -> int:
        return (self.size // self.patch) ** 2


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the transformer / DDPM papers."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    def __init__(self, cfg: DenoiserConfig, update: bool = False):
        super().__init__()
        d, self.heads = cfg.width, cfg.heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.cross = cfg.cond == "tokens"
        if self.cross:
            self.norm_c = nn.LayerNorm(d, eps=1e-6)
            self.q_c = nn.Linear(d, d)
            self.kv_c = nn.Linear(d, 2 * d)
            self.proj_c = nn.Linear(d, d)
        self.update = update and self.cross
        if self.update:  # the tokens read the patches: attention, then an MLP, both residual and zero at the start
            self.norm_t = nn.LayerNorm(d, eps=1e-6)
            self.norm_tx = nn.LayerNorm(d, eps=1e-6)
            self.q_t = nn.Linear(d, d)
            self.kv_t = nn.Linear(d, 2 * d)
            self.proj_t = nn.Linear(d, d)
            self.mlp_t = nn.Sequential(nn.LayerNorm(d, eps=1e-6), nn.Linear(d, 2 * d), nn.GELU(approximate="tanh"),
                                       nn.Linear(2 * d, d))
            for m in (self.proj_t, self.mlp_t[-1]):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.ada = nn.Linear(d, 6 * d)  # shift/scale/gate for attention and MLP, from the time embedding
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def _split(self, x):
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, emb, ctx=None, ctx_bias=None):
        """x: (N, L, d) patch tokens; emb: (N, d) time (and pooled label) embedding; ctx: the class tokens,
        (1, 25, d) while they are the same for every sample (their keys and values computed once per call and
        broadcast), (N, 25, d) once a block has updated them; ctx_bias: (N, 1, 1, 25) additive mask, 0 where
        present, -1e4 where absent. Returns (x, ctx), ctx updated by a block with `update`."""
        b, n, d = x.shape
        scale = 1.0 / math.sqrt(d // self.heads)  # a constant, so an ONNX export needs no shape arithmetic
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(emb)).chunk(6, dim=1)  # 6 x (N, d)
        q, k, v = self.qkv(modulate(self.norm1(x), sh1, sc1)).chunk(3, dim=-1)  # 3 x (N, L, d)
        a = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v), scale=scale)  # (N, H, L, d/H)
        x = x + g1[:, None] * self.proj(a.transpose(1, 2).reshape(b, n, d))  # (N, L, d)
        if self.cross:
            k, v = (self._split(z).expand(b, -1, -1, -1) for z in self.kv_c(ctx).chunk(2, dim=-1))  # (N, H, 25, d/H)
            a = F.scaled_dot_product_attention(self._split(self.q_c(self.norm_c(x))), k, v, attn_mask=ctx_bias,
                                               scale=scale)  # (N, H, L, d/H)
            x = x + self.proj_c(a.transpose(1, 2).reshape(b, n, d))  # (N, L, d)
            if self.update:
                k, v = (self._split(z) for z in self.kv_t(self.norm_tx(x)).chunk(2, dim=-1))  # (N, H, L, d/H)
                q = self._split(self.q_t(self.norm_t(ctx)).expand(b, -1, -1))  # (N, H, 25, d/H)
                a = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (N, H, 25, d/H)
                ctx = ctx + self.proj_t(a.transpose(1, 2).reshape(b, -1, d))  # (N, 25, d)
                ctx = ctx + self.mlp_t(ctx)
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2)), ctx  # (N, L, d), tokens


class Denoiser(nn.Module):
    """(x_t: N x C x H x W, t: N, cond: N x 24 multi-hot) -> network output (epsilon or v), N x C x H x W."""

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.width, cfg.patch
        self.patchify = nn.Conv2d(cfg.in_channels, d, p, p)
        self.pos = nn.Parameter(torch.randn(1, cfg.tokens, d) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.class_emb = nn.Parameter(torch.randn(cfg.num_classes + 1, d) * 0.02)  # last row: the null token
        if cfg.layout:
            self.layout_in = nn.Conv2d(cfg.num_classes, d, p, p)
            nn.init.zeros_(self.layout_in.weight)
            nn.init.zeros_(self.layout_in.bias)
            grid = (torch.arange(cfg.size, dtype=torch.float32) + 0.5) / cfg.size
            self.register_buffer("grid", grid, persistent=False)
        if cfg.pooled and cfg.cond == "tokens":
            self.cond_emb = nn.Linear(cfg.num_classes, d)
            nn.init.zeros_(self.cond_emb.weight)
            nn.init.zeros_(self.cond_emb.bias)
        # the last block's tokens would be read by no one: it does not update them
        self.blocks = nn.ModuleList(Block(cfg, update=cfg.token_update and i < cfg.depth - 1) for i in range(cfg.depth))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, p * p * cfg.in_channels)
        for m in (self.ada_out, self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, cond, feature_layer: int | None = None):
        """x: (N, C, H, W) noisy latents, t: (N,) integer timesteps, cond: (N, 24) multi-hot. With feature_layer
        (a block index), returns (output, the patch tokens (N, L, d) after that block): one pass for a trainer that
        also aligns the hidden tokens (REPA, python/training/repa.py); exports call it without."""
        cfg = self.cfg
        n = x.shape[0]
        h, emb, ctx, mask = self._inputs(x, t, cond)
        kept = None
        for i, blk in enumerate(self.blocks):
            h, ctx = blk(h, emb, ctx, mask)  # (N, L, d)
            if i == feature_layer:
                kept = h
        sh, sc = self.ada_out(F.silu(emb)).chunk(2, dim=1)  # 2 x (N, d)
        h = self.out(modulate(self.norm_out(h), sh, sc))  # (N, L, p * p * C)
        g, p, c = cfg.size // cfg.patch, cfg.patch, cfg.in_channels
        out = h.view(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, cfg.size, cfg.size)  # (N, C, H, W)
        return out if feature_layer is None else (out, kept)

    def features(self, x, t, cond, layers) -> list[torch.Tensor]:
        """The token features (N, L, d) after each block in `layers` (indices, ascending): what a discriminator
        built on this network reads (python/adversarial.py). Blocks past the last one asked for are not run."""
        h, emb, ctx, mask = self._inputs(x, t, cond)
        out = []
        for i, blk in enumerate(self.blocks[: max(layers) + 1]):
            h, ctx = blk(h, emb, ctx, mask)
            if i in layers:
                out.append(h)
        return out

    def blobs(self, cond, places):
        """(N, 24) multi-hot and (N, 72) places -> (N, 24, H, W): one Gaussian (sigma = the object's r) per present
        object on the latent grid."""
        u, v, r = places.float().view(-1, self.cfg.num_classes, 3).unbind(-1)  # 3 x (N, 24)
        g = self.grid
        inv = 1.0 / (2.0 * (r.clamp(min=1e-2) ** 2))[..., None]  # (N, 24, 1)
        bx = torch.exp(-((g - u[..., None]) ** 2) * inv)  # (N, 24, W)
        by = torch.exp(-((g - v[..., None]) ** 2) * inv)  # (N, 24, H)
        return (cond > 0.5).float()[..., None, None] * by[..., :, None] * bx[..., None, :]

    def _inputs(self, x, t, cond):
        """(patch tokens, time and pooled-label embedding, class tokens, their mask): what every block takes."""
        cfg = self.cfg
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.pos  # (N, L, d), L = (H / p)^2 tokens
        if cfg.layout:
            cond, places = cond[:, :cfg.num_classes], cond[:, cfg.num_classes:]
            h = h + self.layout_in(self.blobs(cond, places).to(h.dtype)).flatten(2).transpose(1, 2)
        emb = self.t_mlp(timestep_embedding(t, cfg.width))  # (N, d)
        ctx = mask = None
        if cfg.cond == "sum":
            emb = emb + cond @ self.class_emb[:-1] + self.class_emb[-1]  # (N, d)
        else:
            ctx = self.class_emb[None]  # (1, 25, d): 24 classes and the null token
            if cfg.pooled:
                emb = emb + self.cond_emb(cond.to(emb.dtype))  # (N, d)
            present = torch.cat([(cond > 0.5).to(h.dtype), torch.ones_like(cond[:, :1], dtype=h.dtype)], dim=1)
            # (N, 1, 1, 25): attend to the present objects and the null token (always present, so no row is
            # empty). An additive mask rather than a boolean one: exp(-1e4) is exactly 0 in fp32 and fp16, and
            # the ONNX graph needs no NaN guard for fully masked rows.
            mask = ((present - 1.0) * 1e4)[:, None, None, :]
        return h, emb, ctx, mask


def save_denoiser(model: Denoiser, folder: Path, extra: dict | None = None, half: bool = False) -> None:
    """The weights and config; a layout model's placement prior (`model.layout_bank`) beside them."""
    if model.cfg.layout and getattr(model, "layout_bank", None) is None:
        raise UserError("a layout model is saved with its placement prior: set model.layout_bank (python.data.layout."
                        "make_bank) first")
    save_weights(folder, model, "denoiser.safetensors", {"denoiser": asdict(model.cfg), **(extra or {})}, half,
                 also=model.layout_bank.save if model.cfg.layout else None)


def denoiser_config(cfg: dict, where: Path) -> DenoiserConfig:
    try:
        return DenoiserConfig(**cfg["denoiser"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{where / 'config.json'}: not a denoiser config ({type(e).__name__}: {e})") from None


def load_denoiser(folder: Path | None = None, device="cpu", layout_for: str | None = None) -> tuple[Denoiser, dict]:
    """(denoiser, config dict with the schedule and anything else saved beside it). layout_for: the name of a tool
    that calls the network with label sets alone, which a layout model (DenoiserConfig.layout) is refused for."""
    folder = Path(folder) if folder else SHIPPED_LDM
    cfg = read_config(folder, "denoiser.safetensors", "LDM", "python -m python.train_ldm")
    if layout_for and cfg.get("denoiser", {}).get("layout"):
        raise UserError(f"{folder}: a layout denoiser (its condition carries where each object stands, "
                        f"python/core/layout.py); {layout_for} calls its network with label sets alone and does not "
                        "take one yet")
    model = load_state_into(Denoiser(denoiser_config(cfg, folder)), folder / "denoiser.safetensors")
    if model.cfg.layout:  # the placement prior the samplers draw the places from (python/core/layout.py)
        model.layout_bank = LayoutBank.load(folder)
    return model.to(device).eval(), cfg
