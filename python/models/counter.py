"""The evaluation's object counter: how many objects a 64x64 image holds (python -m python.train_counter).

The judges name classes; they cannot count. A requested object drawn twice ("red cube" asked, two red cubes drawn)
or a faint ghost of one reads to them as the set that was asked for, so the judges' accuracy and their
unrequested-object rate do not see the GAN path's and the LDM's commonest fault. This network counts the objects in
an image: a small CNN with one head over totals 0..max_total (the last meaning that many or more), trained on fresh
renders of 1-5 objects in which a class may repeat (python/data/synthetic.py render_count_arrays), never on a
generated image. Like the judges it reads images, not latents, and no generator is trained against it or selected
by it (the trainers' count term, python/adversarial.py --count-weight, reads the latent counter of
python/models/classifier.py, a different network on a different input trained on other renders), so its figures
are evidence about the generators. python/evaluation/fidelity.py reports them beside their floors: real renders
and their VAE reconstructions, counted by the same network.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from python.models.weights import SHIPPED, load_state_into, read_config, save_weights

SHIPPED_COUNTER = SHIPPED / "counter"


class ImageCounter(nn.Module):
    """image (N, 3, 64, 64) in [-1, 1] -> logits of the number of objects, 0..max_total (N, max_total + 1)."""

    def __init__(self, max_total: int = 5, widths: tuple = (32, 64, 128, 256)):
        super().__init__()
        self.max_total, self.widths = max_total, tuple(widths)
        layers, cin = [], 3
        for w in widths:  # 64 -> 32 -> 16 -> 8 -> 4
            for stride in (2, 1):
                layers += [nn.Conv2d(cin, w, 3, stride, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, max_total + 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))


def save_counter(net: ImageCounter, folder: Path, extra: dict) -> None:
    save_weights(folder, net, "counter.safetensors", {"max_total": net.max_total, "widths": list(net.widths),
                                                       **extra}, half=True)


def load_counter(folder: Path | None = None) -> tuple[ImageCounter, dict]:
    folder = Path(folder) if folder else SHIPPED_COUNTER
    cfg = read_config(folder, "counter.safetensors", "object counter", "python -m python.train_counter")
    net = ImageCounter(cfg["max_total"], tuple(cfg["widths"]))
    load_state_into(net, folder / "counter.safetensors")
    return net.eval().requires_grad_(False), cfg


@torch.no_grad()
def count_objects(net: ImageCounter, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """The most likely number of objects in each image (N,) int64 (max_total means that many or more)."""
    return torch.cat([net(images[i:i + batch].float()).argmax(1) for i in range(0, len(images), batch)])


def count_figures(net: ImageCounter, images: torch.Tensor, labels) -> dict:
    """How the counted objects compare with the number requested (the label sets' sizes, clipped to the counter's
    range): the share of images with more ("surplus": an extra object, a requested one drawn twice, a ghost), with
    fewer ("deficit": a missing or merged object), and the mean difference."""
    k = torch.as_tensor(labels).float().sum(1).clamp(max=net.max_total).long()
    d = count_objects(net, images) - k
    return {"counted_surplus": float((d > 0).float().mean()), "counted_deficit": float((d < 0).float().mean()),
            "counted_excess_mean": float(d.float().mean())}
