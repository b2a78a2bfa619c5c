"""Do a frozen network's features say which objects a latent holds? A linear probe on pooled features of real latents.

    python bench/feature_probe.py --data data/iclevr [--network ldm|classifier] [--classifier DIR] [--latents 3072]

For the LDM: the token features after blocks 1, 3, 5 and 7 (what python.adversarial's heads read), mean- and
max-pooled, of real latents noised to t < --t-max, with the label set withheld (the empty set) and, for comparison,
given (then the features carry the set itself, not only the image). For a latent classifier: its conv stages.
A logistic-regression probe (Adam, 300 steps, L2 1e-4) is fitted on two thirds of the latents and scored on the rest
with the top-k accuracy of the official evaluator (k = the number of requested objects). Reads real latents only;
no judge, no generator.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from python.core.errors import UserError, cli  # noqa: E402


def probe_accuracy(feats: torch.Tensor, labels: torch.Tensor, train: int) -> float:
    """Top-k accuracy on rows train: of a logistic-regression probe fitted on rows :train of standardised feats."""
    feats = (feats - feats[:train].mean(0)) / (feats[:train].std(0) + 1e-6)
    w = torch.zeros(feats.shape[1], labels.shape[1], requires_grad=True)
    b = torch.zeros(labels.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(300):
        loss = F.binary_cross_entropy_with_logits(feats[:train] @ w + b, labels[:train]) + 1e-4 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits, y = feats[train:] @ w + b, labels[train:]
    k, top = y.sum(1).long(), logits.argsort(1, descending=True)
    return float(np.mean([y[i, top[i, :k[i]]].sum().item() / k[i].item() for i in range(len(k))]))


def pooled(feats: list[torch.Tensor]) -> torch.Tensor:
    """Token features (N, L, d) of several layers -> (N, sum of 2d): each layer's mean and max over its tokens."""
    return torch.cat([torch.cat([h.mean(1), h.amax(1)], 1) for h in feats], 1)


@cli
def main(argv=None):
    from python.adversarial import ClassifierFeatures
    from python.core.diffusion import Schedule, add_noise
    from python.models.classifier import load_classifier_for
    from python.models.denoiser import load_denoiser
    from python.training.latents import load_latents
    from python.training.losses import coeff_tables

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "iclevr")
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--network", choices=("ldm", "classifier"), default="ldm")
    parser.add_argument("--classifier", type=Path, help="latent classifier folder (default: weights/classifier)")
    parser.add_argument("--latents", type=int, default=3072)
    parser.add_argument("--t-max", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.latents < 6:
        raise UserError(f"--latents must be >= 6, got {args.latents}")
    torch.manual_seed(args.seed)
    vae = args.weights / "vae"
    den, cfg = load_denoiser(args.weights / "ldm", layout_for="bench/feature_probe.py")
    schedule = Schedule(**cfg["schedule"])
    if any(not 1 <= t <= schedule.T for t in args.t_max):
        raise UserError(f"--t-max values must be in 1..{schedule.T}, got {args.t_max}")
    lat = load_latents(args.data, vae)
    gen = torch.Generator().manual_seed(args.seed)
    idx = torch.randint(0, len(lat), (args.latents,), generator=gen)
    z, y = lat.sample(idx, gen), lat.labels[idx].float()
    ca, cs = coeff_tables(schedule)
    train = 2 * args.latents // 3
    den = den.float()
    if args.network == "classifier":
        net = ClassifierFeatures(load_classifier_for(args.classifier or args.weights / "classifier", vae))
    rows = []
    for t_max in args.t_max:
        t = torch.randint(0, t_max, (args.latents,), generator=gen)
        x = add_noise(z, torch.randn(z.shape, generator=gen), ca[t], cs[t])
        if args.network == "ldm":
            nets = {"label set withheld": torch.zeros_like(y), "label set given": y}
            for name, c in nets.items():
                with torch.no_grad():
                    feats = pooled(den.features(x, t, c, [1, 3, 5, 7]))
                rows.append({"network": "ldm", "t_max": t_max, "input": name,
                             "accuracy": round(probe_accuracy(feats, y, train), 4)})
                print(json.dumps(rows[-1]), flush=True)
        else:
            with torch.no_grad():
                feats = pooled(net.features(x, t, None, list(range(net.depth))))
            rows.append({"network": "classifier", "t_max": t_max,
                         "accuracy": round(probe_accuracy(feats, y, train), 4)})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
