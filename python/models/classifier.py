"""Label classifiers of latents, trained on real latents only (python/training/classifier.py trains them).

Their users: best-of-N selection reads the shipped one (python/core/best_of.py), training freezes one as a class
term (train_gan, distill, train_ldm --cls-weight), and tune_ldm's reward reads an object counter. Neither judge
takes part in training them, and they never see a generated latent, so the judges that score the result stay
independent of them.

- LatentClassifier: a small CNN on the latent grid itself.
- CountClassifier: a label network and a total-count network, trained on renders in which a class may repeat.
- A total counter: a LatentClassifier over 0..max_total objects alone (train_classifier --counts N --total-only),
  what the LDM's classifier guidance reads for its count term (weights/guide/counter).
- PixelClassifier: the latent through the frozen VAE decoder, then a CNN on the 64x64 image. Still a classifier of
  latents trained on real latents only (the decoder is its frozen first stage), but it sees what the decoder draws:
  stricter about shape (a sphere without its highlight reads as a cube in the image, not in the latent). Decoder
  103 MFLOPs + CNN ~115 MFLOPs per latent; the decoder's weights are stored with it.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from python.core.diffusion import DEFAULT_COUNT_WEIGHT
from python.core.errors import UserError
from python.core.labels import NUM_CLASSES
from python.models.vae import VAE, Decoder, VAEConfig, load_vae, load_vae_config, require_latent_space
from python.models.weights import SHIPPED, load_state_into, read_config, save_weights

SHIPPED_CLASSIFIER = SHIPPED / "classifier"
SHIPPED_GUIDE = SHIPPED / "guide"  # the classifier of the LDM's classifier guidance (not the best-of selector)
LATENT_WIDTHS = (48, 96, 192)  # a latent network's stage widths unless told (and a config.json without "widths")


class LatentClassifier(nn.Module):
    """latent (N, C, 16, 16) -> 24 label logits. Batch norm, no spectral norm: a discriminator's auxiliary head
    (spectral-normed features shared with the realness score) learns the labels too weakly to steer a generator."""

    def __init__(self, latent_channels: int, num_classes: int = NUM_CLASSES, widths: tuple = LATENT_WIDTHS):
        super().__init__()
        self.widths = tuple(widths)
        layers, cin = [], latent_channels
        for i, w in enumerate(widths):
            for j in range(2):
                layers += [nn.Conv2d(cin, w, 3, 2 if (i and not j) else 1, 1, bias=False), nn.BatchNorm2d(w),
                           nn.ReLU(inplace=True)]
                cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))  # (N, 24)


class CountClassifier(nn.Module):
    """latent (N, C, 16, 16) -> (label logits (N, 24), logits of how many objects it holds, 0..max_total, the last
    meaning that many or more: (N, max_total + 1)), from two LatentClassifier networks.

    A label classifier says which classes are there, not how many objects: a colour drawn twice reads like one. This
    one also counts; trained on renders where a class may repeat (python/data/synthetic.py render_count_arrays, never
    a generated latent), it can tell a generator that it drew an object nobody asked for, be it of a requested class
    or not (python/tune_ldm.py). Two networks, not two heads on one: with a shared trunk the count, learned first,
    took the features and the labels stayed at their prior (measured: label BCE 0.31 after 300 steps against 0.13
    alone; a per-class count head, tried before, learned only "none of each class")."""

    def __init__(self, latent_channels: int, max_total: int = 5, widths: tuple = LATENT_WIDTHS):
        super().__init__()
        self.labels = LatentClassifier(latent_channels, widths=widths)
        self.total = LatentClassifier(latent_channels, max_total + 1, widths=widths)
        self.max_total = max_total

    def forward(self, x):
        return self.labels(x), self.total(x)


class PixelClassifier(nn.Module):
    """latent -> the frozen VAE decoder -> 64x64 image -> a small CNN -> 24 label logits."""

    def __init__(self, vae_cfg: VAEConfig, num_classes: int = NUM_CLASSES, widths: tuple = (32, 64, 128, 256)):
        super().__init__()
        self.vae_cfg = vae_cfg
        self.decoder = Decoder(VAE(vae_cfg))
        layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        cin = widths[0]
        for w in widths:
            for stride in (2, 1):
                layers += [nn.Conv2d(cin, w, 3, stride, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    @classmethod
    def from_vae(cls, vae_folder: Path) -> "PixelClassifier":
        vae = load_vae(vae_folder)
        net = cls(vae.cfg)
        net.decoder.load_state_dict(Decoder(vae).state_dict())
        return net

    def forward(self, z):
        return self.head(self.features(self.decoder(z)).mean(dim=(2, 3)))  # (N, 24)


class _Backprop(nn.Module):
    """One frozen LatentClassifier as a plain forward graph of its own forward and backward pass: batch norm folded
    into its convolution, ReLU as the forward pass's mask, each convolution's transpose. ClassifierGradient's part."""

    def __init__(self, cls: LatentClassifier, size: int):
        """size: the latent grid's side (the transposed convolutions' output sizes follow from it)."""
        super().__init__()
        convs = [m for m in cls.features if isinstance(m, nn.Conv2d)]
        norms = [m for m in cls.features if isinstance(m, nn.BatchNorm2d)]
        self.strides, self.pads, self.out_pads = [], [], []
        weights, shifts = [], []
        for conv, bn in zip(convs, norms):
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)  # eval-mode batch norm, folded
            weights.append(conv.weight.detach() * scale[:, None, None, None])
            shifts.append(bn.bias.detach() - bn.running_mean * scale)
            s, p, k = conv.stride[0], conv.padding[0], conv.kernel_size[0]
            out = (size + 2 * p - k) // s + 1
            self.out_pads.append(size - ((out - 1) * s - 2 * p + k))  # the transpose's output is the input's size
            self.strides.append(s)
            self.pads.append(p)
            size = out
        self.weights = nn.ParameterList(nn.Parameter(w, requires_grad=False) for w in weights)
        # The backward pass's own weights, negated: a transposed convolution that reads the same initializer as a
        # convolution is computed wrongly by OpenVINO's CPU plugin (2026.x; ~100% error, tests/test_quantize.py), and
        # the ONNX exporter merges equal initializers, so a plain copy would be shared again. With every layer's
        # weights negated the result is (-1)^layers times the gradient, undone once on the (N, channels) top.
        self.weights_t = nn.ParameterList(nn.Parameter(-w, requires_grad=False) for w in weights)
        self.sign = (-1.0) ** len(weights)
        self.shifts = nn.ParameterList(nn.Parameter(b, requires_grad=False) for b in shifts)
        self.head = nn.Parameter(cls.head.weight.detach().clone(), requires_grad=False)  # (outputs, channels)
        self.head_bias = nn.Parameter(cls.head.bias.detach().clone(), requires_grad=False)

    def forward(self, latents):
        """-> (logits, what the backward pass needs: the ReLU masks and the last feature map)."""
        h, masks = latents, []
        for w, b, s, p in zip(self.weights, self.shifts, self.strides, self.pads):
            pre = F.conv2d(h, w, b, s, p)
            masks.append((pre > 0).to(pre.dtype))
            h = F.relu(pre)
        return h.mean(dim=(2, 3)) @ self.head.t() + self.head_bias, (masks, h)

    def backward(self, d_logits, saved):
        """d loss / d logits (N, outputs) -> d loss / d latents (N, C, H, W)."""
        masks, h = saved
        g = d_logits @ (self.sign * self.head)  # d loss / d pooled features (N, channels)
        g = (g / (h.shape[2] * h.shape[3]))[:, :, None, None].expand_as(h)  # through the mean over the grid
        for i in range(len(masks) - 1, -1, -1):
            g = F.conv_transpose2d(g * masks[i], self.weights_t[i], None, self.strides[i], self.pads[i],
                                   self.out_pads[i])
        return g


class ClassifierGradient(nn.Module):
    """(latents (N, C, H, W), multi-hot cond (N, 24)) -> the gradient with respect to the latents of the guidance
    loss: a frozen LatentClassifier's binary cross-entropy for `cond`, summed over the 24 classes, plus, where a
    latent object counter is given, count_weight times the cross-entropy of its total for "as many objects as
    requested" (a requested class drawn twice reads as that class to the first term, not to the second). What
    classifier guidance on the predicted x_0 subtracts (python/core/sampling.py). Each backward pass is written out
    (_Backprop), so the module is a plain forward graph that ONNX, TorchScript and the C++ sampler run without
    autograd; tests/test_classifier_guidance.py holds it to torch.autograd. One forward and one backward of each
    network per latent: ~3 x 22 M multiply-adds for the shipped label classifier, ~3 x 10 M for its counter."""

    def __init__(self, cls: LatentClassifier, size: int, counter: LatentClassifier | None = None,
                 count_weight: float = 0.0):
        """size: the latent grid's side; counter: a network of total-count logits (a CountClassifier's `total`:
        0..max_total objects, the last bin meaning that many or more), read when count_weight > 0."""
        super().__init__()
        self.labels = _Backprop(cls, size)
        self.total = _Backprop(counter, size) if counter is not None and count_weight > 0 else None
        self.count_weight = float(count_weight) if self.total is not None else 0.0  # the weight in effect

    def forward(self, latents, cond):
        logits, saved = self.labels(latents)
        g = self.labels.backward(torch.sigmoid(logits) - cond, saved)
        if self.total is not None:
            logits, saved = self.total(latents)
            bins = logits.shape[1]
            k = cond.sum(dim=1, keepdim=True).round().clamp(max=bins - 1)  # requested objects; the last bin: the rest
            target = (torch.arange(bins, dtype=cond.dtype, device=cond.device)[None] == k).to(cond.dtype)
            g = g + self.count_weight * self.total.backward(torch.softmax(logits, dim=1) - target, saved)
        return g  # (N, C, H, W)


def total_counter(latent_channels: int, max_total: int = 5, widths: tuple = LATENT_WIDTHS) -> LatentClassifier:
    """A LatentClassifier of how many objects a latent holds: logits over 0..max_total, the last meaning that many
    or more (a CountClassifier's `total` network, alone)."""
    net = LatentClassifier(latent_channels, max_total + 1, widths)
    net.max_total = max_total
    return net


def save_classifier(cls: nn.Module, folder: Path, extra: dict) -> None:
    """fp16 weights + config.json (the classifier's input and whatever provenance `extra` holds)."""
    if isinstance(cls, PixelClassifier):
        head = {"latent_channels": cls.vae_cfg.latent_channels, "input": "pixels", "vae": asdict(cls.vae_cfg)}
    elif isinstance(cls, CountClassifier):
        head = {"latent_channels": cls.labels.features[0].in_channels, "output": "counts", "max_total": cls.max_total,
                "widths": list(cls.labels.widths)}
    elif hasattr(cls, "max_total"):
        head = {"latent_channels": cls.features[0].in_channels, "output": "total", "max_total": cls.max_total,
                "widths": list(cls.widths)}
    else:
        head = {"latent_channels": cls.features[0].in_channels, "widths": list(cls.widths)}
    save_weights(folder, cls, "classifier.safetensors", {**head, **extra}, half=True)


def load_classifier(folder: Path | None = None) -> tuple[nn.Module, dict]:
    folder = Path(folder) if folder else SHIPPED_CLASSIFIER
    cfg = read_config(folder, "classifier.safetensors", "latent classifier", "python -m python.train_classifier")
    widths = tuple(cfg.get("widths", LATENT_WIDTHS))
    if cfg.get("output") == "counts":
        cls = CountClassifier(cfg["latent_channels"], cfg["max_total"], widths)
    elif cfg.get("output") == "total":
        cls = total_counter(cfg["latent_channels"], cfg["max_total"], widths)
    elif cfg.get("input") == "pixels":
        cls = PixelClassifier(VAEConfig(**cfg["vae"]))
    else:
        cls = LatentClassifier(cfg["latent_channels"], widths=widths)
    load_state_into(cls, folder / "classifier.safetensors")
    return cls.eval().requires_grad_(False), cfg


def load_classifier_for(folder: Path | None, vae_dir: Path, output: str = "labels") -> nn.Module:
    """The classifier of `folder` (default: the shipped one), refused unless it reads vae_dir's latent space and
    gives `output` ("labels": 24 label logits; "counts": a CountClassifier's label and total logits; "total": a
    total counter's logits)."""
    folder = Path(folder) if folder else SHIPPED_CLASSIFIER
    cls, cfg = load_classifier(folder)
    if cfg.get("output", "labels") != output:
        raise UserError(f"{folder}: a classifier of {cfg.get('output', 'labels')}, but {output} are needed here "
                        f"(label classifiers: train_classifier; object counters: train_classifier --counts N; "
                        f"total counters: train_classifier --counts N --total-only)")
    require_latent_space(folder, cfg, vae_dir)
    return cls


def load_class_grad(folder: Path | None, vae_dir: Path,
                    count_weight: float = DEFAULT_COUNT_WEIGHT) -> ClassifierGradient:
    """The classifier guidance's gradient module for the label classifier in `folder` (default: the shipped
    weights/guide) and, where `folder`/counter holds a latent object counter (train_classifier --counts) and
    count_weight > 0, its count term; refused unless both read vae_dir's latent space."""
    folder = Path(folder) if folder else SHIPPED_GUIDE
    if not (folder / "classifier.safetensors").exists():
        raise UserError(f"{folder}: no guidance classifier (classifier.safetensors) for classifier guidance; give "
                        f"--class-scale 0 to sample without it, or train one: python -m python.train_classifier "
                        f"--data DATA --run-dir RUN --noise 0.5 --out {folder}")
    cls = load_classifier_for(folder, vae_dir)
    if not isinstance(cls, LatentClassifier):
        raise UserError(f"{folder}: classifier guidance needs a latent classifier (train_classifier without --pixels), "
                        f"not a {type(cls).__name__}")
    if not (math.isfinite(count_weight) and count_weight >= 0):
        raise UserError(f"count weight must be 0 (no count term) or a positive weight, got {count_weight}")
    counter = None
    if count_weight > 0 and (folder / "counter" / "config.json").exists():
        counter = load_classifier_for(folder / "counter", vae_dir, output="total")
    return ClassifierGradient(cls, load_vae_config(vae_dir).latent_shape[-1], counter, count_weight).eval()
