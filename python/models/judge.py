"""The judge: the course's evaluator network and metric, device-agnostic, plus a second judge.

Primary judge = the official architecture: torchvision resnet18 whose fc is
Sequential(Linear(512, 24), Sigmoid()), stored in the official layout {"model": state_dict}
(`checkpoint.pth`), so the course's checkpoint and ours are interchangeable.
Second judge = a different architecture (a plain VGG-style CNN that keeps full resolution in its
first stage), trained on disjoint renders; generated images must convince both.

The metric (`topk_accuracy`) is the official one: for each image take the top-k outputs, k = its number
of objects, and count how many are among its labels; accuracy = hits / total k. It uses torch.topk
row by row, exactly like the course's code, so ties resolve the same way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file

from python.core.errors import UserError
from python.core.labels import NUM_CLASSES
from python.models.weights import SHIPPED, read_state

SHIPPED_JUDGES = {"primary": SHIPPED / "judge" / "judge.safetensors",
                  "second": SHIPPED / "judge2" / "judge.safetensors"}
ARCHS = ("resnet18", "vgg")


def official_resnet18(num_classes: int = NUM_CLASSES) -> nn.Module:
    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Sequential(nn.Linear(512, num_classes), nn.Sigmoid())
    return net


class VGGJudge(nn.Module):
    """Four stages of two 3x3 conv-BN-ReLU, max-pooled between; global average pool; linear; sigmoid."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32):
        super().__init__()
        layers, cin = [], 3
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            if i:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(cin, num_classes), nn.Sigmoid())

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def build_judge(arch: str) -> nn.Module:
    if arch == "resnet18":
        return official_resnet18()
    if arch == "vgg":
        return VGGJudge()
    raise UserError(f"unknown judge architecture {arch!r}; valid: {', '.join(ARCHS)}")


def judge_logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pre-sigmoid scores (for a numerically sound BCE during training)."""
    fc, sig = net.fc[0], net.fc[1]
    assert isinstance(sig, nn.Sigmoid)
    net.fc = nn.Identity()
    try:
        return fc(net(x))
    finally:
        net.fc = nn.Sequential(fc, sig)


@torch.no_grad()
def judge_features(net: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The pooled features the judge's last layer reads (512 for resnet18, 256 for vgg): a space in which
    distances between images measure what the judge sees (used for the diversity figure)."""
    fc = net.fc
    net.fc = nn.Identity()
    try:
        return torch.cat([net(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)])
    finally:
        net.fc = fc


def _arch_of(state: dict) -> str:
    return "resnet18" if "conv1.weight" in state else "vgg"


def load_judge(path: str | Path | None = None, device: str | torch.device = "cpu", which: str = "primary") -> nn.Module:
    """A judge from an official-layout .pth ({"model": state_dict}) or our .safetensors, in eval mode.

    Loads on the CPU first (map_location), so checkpoints saved on any device load anywhere."""
    path = Path(path) if path else SHIPPED_JUDGES[which]
    if not path.exists():
        raise UserError(f"{path}: judge checkpoint not found"
                        + (" (train one with `python -m python.train_evaluator`)" if path in SHIPPED_JUDGES.values() else ""))
    expected = ("expected the official layout: a torch file holding a dict with key 'model' = the state_dict "
                "of torchvision resnet18 with fc = Sequential(Linear(512, 24), Sigmoid()), or our .safetensors")
    if path.suffix == ".safetensors":
        state = read_state(path)
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle / zip errors: a corrupt or foreign file
            raise UserError(f"{path}: not a readable torch checkpoint ({type(e).__name__}); {expected}") from None
        if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt["model"], dict):
            keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise UserError(f"{path}: found {keys}; {expected}")
        state = ckpt["model"]
    net = build_judge(_arch_of(state))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: state_dict does not match the judge (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); {expected}")
    return net.to(device).eval()


def save_judge(net: nn.Module, out_dir: Path, fp16_safetensors: bool = True) -> None:
    """Write checkpoint.pth (official layout, fp32) and judge.safetensors (fp16 for shipping)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    torch.save({"model": state}, out_dir / "checkpoint.pth")
    half = {k: v.half() if fp16_safetensors and v.is_floating_point() else v for k, v in state.items()}
    save_file(half, str(out_dir / "judge.safetensors"))


def topk_accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """The official metric: per image top-k (k = number of labels) hits over total k."""
    hits, total = topk_hits(outputs, labels)
    return hits.sum() / max(total.sum(), 1)


def topk_hits(outputs: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (hits, k): the official loop, kept row by row so ties break as torch.topk does."""
    outputs, labels = torch.as_tensor(outputs).cpu(), torch.as_tensor(labels).cpu()
    hits, total = np.zeros(len(outputs), np.int64), np.zeros(len(outputs), np.int64)
    for i in range(len(outputs)):
        k = int(labels[i].sum().item())
        total[i] = k
        if k == 0:
            continue
        _, out_idx = outputs[i].topk(k)
        _, lab_idx = labels[i].topk(k)
        hits[i] = sum(int(j in lab_idx) for j in out_idx)
    return hits, total


@torch.no_grad()
def judge_probs(net: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Judge outputs (sigmoid probabilities) for (N, 3, 64, 64) images in [-1, 1]."""
    device = next(net.parameters()).device
    outs = [net(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0, NUM_CLASSES)


def judge_score(net: nn.Module, images: torch.Tensor, labels) -> dict:
    """Accuracy overall and by number of objects, for images in [-1, 1] and multi-hot labels."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    if images.shape[1:] != (3, 64, 64):
        raise UserError(f"judge expects images of shape (N, 3, 64, 64) in [-1, 1], got {tuple(images.shape)}")
    if len(images) != len(labels):
        raise UserError(f"{len(images)} images but {len(labels)} label sets")
    hits, total = topk_hits(judge_probs(net, images), labels)
    res = {"accuracy": float(hits.sum() / max(total.sum(), 1)), "n": len(labels)}
    res["by_objects"] = {int(k): float(hits[total == k].sum() / (k * (total == k).sum()))
                         for k in np.unique(total) if k > 0}
    return res
