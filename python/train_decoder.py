"""Retrain only the VAE decoder, for the same latent space: a sharper decoder without retraining the generators.

    python -m python.train_decoder --data data/iclevr --vae weights/vae --run-dir runs/decoder \\
        --decoder-channels 96 64 --decoder-up nearest --steps 8000

The encoder, the scale factor and therefore the latent space (python.models.vae.vae_digest) are kept; the LDM and
the GAN trained on them stay valid. The decoder learns from the latent cache (posterior samples of every training
image and its mirror image, encoded once), so no encoder runs during training. Loss: mean squared error plus an
L1 term on image gradients (finite differences), which weighs the edges and corners that tell a small cube from a
cylinder more than their share of pixels. Every --eval-every steps: PSNR and the primary judge's accuracy on
reconstructions of held-out renders (reported, never in the loss).

--adv-weight W adds an adversarial term, as the VAEs of latent diffusion do (Esser et al. 2021): a patch
discriminator (8x8 logits for a 64x64 image, hinge loss) learns to tell renders from decodings, and the decoder
is pushed towards what it finds real. Why: the latents are posterior samples, and some channels are nearly as
noisy as they are spread, so a decoder trained on squared error alone returns the average over what the noise
hides: a sphere's one- or two-pixel specular highlight averages away, and a gray or green sphere without it
reads as a cube. The adversarial term asks for a sharp, plausible highlight instead of the average. Its
weight is adaptive (the ratio of the two losses' gradient norms at the decoder's last layer, times W).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from python.core.errors import UserError, cli
from python.data.dataset import heldout_or_train, load_split, to_model_range
from python.models.gan import PatchDiscriminator
from python.models.judge import SHIPPED_JUDGES, load_judge
from python.models.vae import SHIPPED_VAE, VAE, VAEConfig, load_vae, save_vae, vae_digest
from python.training.autoencoder import log_reconstructions, reconstruction_figures
from python.training.latents import load_latents
from python.training.loop import Progress, add_run_options, optimiser_step, resolve_config
from python.training.losses import adaptive_weight, gradient_l1
from python.training.rundir import RunDir
from python.training.schedules import warmup_cosine

PRESETS = {
    "tiny": dict(steps=6, batch=8, eval_every=3, lr=1e-3, eval_images=16),
    "full": dict(steps=8000, batch=64, eval_every=1000, lr=1e-3, eval_images=2000),
}


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, "decoder", PRESETS, vae="VAE whose encoder and latent space are kept (default: shipped)")
    parser.add_argument("--decoder-channels", type=int, nargs="+", help="synthesis widths, latent side first")
    parser.add_argument("--decoder-up", choices=("transpose", "nearest"), default="nearest")
    parser.add_argument("--init", action="store_true", help="start from the VAE's decoder (same widths and upsampling)")
    parser.add_argument("--grad-weight", type=float, default=0.5, help="weight of the image-gradient L1 term")
    parser.add_argument("--adv-weight", type=float, default=0.0, help="adversarial term's weight (x the adaptive scale; "
                                                                 "0: none)")
    parser.add_argument("--adv-start", type=int, default=0, help="step at which the decoder starts to get the adversarial "
                                                            "term (the discriminator trains from step 0)")
    parser.add_argument("--posterior", choices=("sample", "mean"), default="sample",
                   help="decode posterior samples (what the generators produce) or the posterior means (what a "
                        "reconstruction decodes)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--eval-images", type=int)
    args = parser.parse_args(argv)
    cfg = resolve_config(PRESETS[args.preset], args)
    src = args.vae or SHIPPED_VAE
    base = load_vae(src)
    if base.cfg.arch != "gdn":
        raise UserError(f"{src}: decoder-only training supports the gdn VAE, not {base.cfg.arch!r}")
    vcfg = VAEConfig(**{**asdict(base.cfg), "decoder_up": args.decoder_up,
                        "decoder_channels": args.decoder_channels or base.cfg.decoder_channels})
    vae = VAE(vcfg)
    vae.net.encoder.load_state_dict(base.net.encoder.state_dict())
    if args.init:
        try:
            vae.net.decoder.load_state_dict(base.net.decoder.state_dict())
        except RuntimeError:
            raise UserError("--init needs the same decoder widths and --decoder-up as the source VAE") from None
    vae.net.encoder.requires_grad_(False)
    cfg.update(vae=asdict(vcfg), latent_digest=vae_digest(src))
    run = RunDir(args.run_dir, cfg, args.resume, fixed=("vae", "latent_digest", "lr"))

    lat = load_latents(args.data, src)  # rows: all originals, then all mirror images
    train = load_split(args.data)
    images_t = torch.from_numpy(np.ascontiguousarray(train.images))
    n = len(train)
    held = heldout_or_train(args.data, train)
    eval_u8, eval_labels = held.images[: cfg["eval_images"]], held.labels[: cfg["eval_images"]]
    judge_path = args.judge or SHIPPED_JUDGES["primary"]
    judge = load_judge(judge_path) if Path(judge_path).exists() else None

    torch.manual_seed(args.seed)
    params = list(vae.net.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    steps = cfg["steps"]
    sched = warmup_cosine(opt, steps)
    disc = PatchDiscriminator() if args.adv_weight > 0 else None
    d_opt = torch.optim.AdamW(disc.parameters(), lr=cfg["lr"], betas=(0.5, 0.9), weight_decay=0.0) if disc else None
    last = [q for q in params if q.ndim == 4][-1]  # the decoder's last convolution
    gen = torch.Generator().manual_seed(args.seed)
    modules, objects = {"model": vae, "disc": disc}, {"opt": opt, "sched": sched, "gen": gen, "d_opt": d_opt}
    step = run.restore(modules, objects) if args.resume else 0
    run.log(f"decoder {sum(p.numel() for p in params) / 1e6:.3f}M params ({vcfg.decoder_up}, "
            f"{vcfg.decoder_channels or vcfg.channels}), latent space {cfg['latent_digest']}, {n} training images")
    vae.train()
    progress = Progress(run, steps, step, show=("mse", "grad_l1", "adv", "d_loss"))
    while step < steps:
        idx = torch.randint(0, len(lat), (cfg["batch"],), generator=gen)  # originals and mirrors alike
        mirrored = idx >= n
        x = to_model_range(images_t[idx % n])
        x = torch.where(mirrored[:, None, None, None], x.flip(3), x)
        mean, std = lat.mean[idx].float(), lat.std[idx].float()
        z = mean + std * torch.randn(mean.shape, generator=gen) if args.posterior == "sample" else mean
        rec = vae.decode(z)
        mse = F.mse_loss(rec, x)
        grad = gradient_l1(rec, x)
        loss = mse + args.grad_weight * grad
        extra = {}
        if disc:
            if step >= args.adv_start:
                disc.requires_grad_(False)
                adv = -disc(rec).mean()
                w = args.adv_weight * adaptive_weight(loss, adv, last)
                loss = loss + w * adv
                disc.requires_grad_(True)
                extra.update(adv=adv.item(), adv_w=w.item())
        optimiser_step(loss, opt, sched, clip=params)
        if disc:  # after the decoder's step: its backward needs the discriminator's weights as they were
            d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean()  # hinge
            optimiser_step(d_loss, d_opt)
            extra["d_loss"] = d_loss.item()
        step += 1
        progress.step(step, len(x), lambda: dict(loss=loss.item(), mse=mse.item(), grad_l1=grad.item(),
                                                  lr=sched.get_last_lr()[0], **extra))
        if step % cfg["eval_every"] == 0 or step == steps:
            log_reconstructions(run, progress, step, vae, eval_u8, eval_labels, judge)
            run.checkpoint(step, modules, objects)
    progress.close()
    vae.eval()
    save_vae(vae, run.path / "final")
    if vae_digest(run.path / "final") != cfg["latent_digest"]:  # the encoder must not have moved
        raise RuntimeError("latent space changed during decoder training")
    res = {**reconstruction_figures(vae, eval_u8, eval_labels, judge), "train_seconds": round(run.elapsed(), 1)}
    (run.path / "final" / "train_result.json").write_text(json.dumps(res, indent=1))
    run.log(f"final: {json.dumps(res)}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
