"""Train the VAE on the i-CLEVR training images, then cache the training set's latents.

    python -m python.train_vae --data data/iclevr --run-dir runs/vae            # the shipped recipe
    python -m python.train_vae --preset tiny --data DIR --run-dir DIR            # seconds, for tests

Loss: mean squared error + beta * KL(q(z|x) || N(0, I)) per latent element; beta is small, so the
posterior stays nearly deterministic (a sharp decoder) while the KL keeps the latent space smooth and
bounded for diffusion and the GAN. After training, the training set (and its mirror images) is
encoded once into the latent cache (python/training/latents.py: posterior mean and std, float16, unscaled,
with labels), and scale_factor = 1 / std of the cached means is stored in config.json, so that the
generators see unit-variance latents z = scale_factor * (mean + std * eps).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from python.core.errors import cli
from python.data.dataset import heldout_or_train, load_split, to_model_range
from python.models.vae import VAE, VAEConfig, save_vae
from python.training.autoencoder import log_reconstructions, reconstruction_figures
from python.training.latents import load_latents
from python.training.loop import Progress, add_run_options, optimiser_step, resolve_config
from python.training.rundir import RunDir
from python.training.schedules import warmup_cosine

PRESETS = {
    "tiny": dict(steps=6, batch=8, eval_every=3, lr=1e-3, channels=[16, 8], eval_images=16),
    "full": dict(steps=12000, batch=64, eval_every=1000, lr=2e-3, channels=[64, 48], eval_images=512),
}


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, "vae", PRESETS, vae=None, judge=None)
    parser.add_argument("--arch", choices=("gdn", "kl"), default="gdn")
    parser.add_argument("--channels", type=int, nargs="+", help="gdn widths, latent side first (default 64 48)")
    parser.add_argument("--kl-channels", type=int, nargs="+", help="kl: diffusers block_out_channels")
    parser.add_argument("--latent-channels", type=int, default=4)
    parser.add_argument("--downsample", type=int, default=4, choices=(2, 4, 8))
    parser.add_argument("--beta", type=float, default=1e-4, help="KL weight per latent element")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--eval-images", type=int)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--no-cache", action="store_true", help="skip building the latent cache")
    args = parser.parse_args(argv)
    cfg = resolve_config(PRESETS[args.preset], args)
    vcfg = VAEConfig(arch=args.arch, latent_channels=args.latent_channels, downsample=args.downsample,
                       channels=cfg["channels"], **({"kl_channels": args.kl_channels} if args.kl_channels else {}))
    cfg["vae"] = asdict(vcfg)
    run = RunDir(args.run_dir, cfg, args.resume, fixed=("vae", "lr"))

    train = load_split(args.data)
    eval_u8 = heldout_or_train(args.data, train).images[: cfg["eval_images"]]
    images_t = torch.from_numpy(np.ascontiguousarray(train.images))

    torch.manual_seed(args.seed)
    vae = VAE(vcfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["lr"], weight_decay=0.0)
    steps = cfg["steps"]
    sched = warmup_cosine(opt, steps)
    gen = torch.Generator().manual_seed(args.seed)
    modules, objects = {"model": vae}, {"opt": opt, "sched": sched, "gen": gen}
    step = run.restore(modules, objects) if args.resume else 0
    run.log(f"VAE {vcfg.arch} {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params, latent {vcfg.latent_shape}, "
            f"{len(train)} training images")
    vae.train()
    progress = Progress(run, steps, step, show=("mse", "kl"))
    while step < steps:
        idx = torch.randint(0, len(images_t), (cfg["batch"],), generator=gen)
        x = to_model_range(images_t[idx])
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            rec, mean, logvar = vae(x)
        mse = F.mse_loss(rec.float(), x)
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
        loss = mse + args.beta * kl
        optimiser_step(loss, opt, sched, clip=vae.parameters())
        step += 1
        progress.step(step, len(x), lambda: dict(loss=loss.item(), mse=mse.item(), kl=kl.item(),
                                                  lr=sched.get_last_lr()[0]))
        if step % cfg["eval_every"] == 0 or step == steps:
            log_reconstructions(run, progress, step, vae, eval_u8)
            run.checkpoint(step, modules, objects)
    progress.close()

    vae.eval()
    save_vae(vae, run.path / "final")
    if args.no_cache:  # comparison runs: the scale factor from a subset, no cache
        mean = vae.encode(to_model_range(train.images[:2048]))[0].detach()
    else:  # the cache is keyed by the weights, not config.json, so setting the scale factor after keeps it valid
        mean = load_latents(args.data, run.path / "final").mean.float()
    vae.cfg.scale_factor = float(1.0 / mean.std())
    save_vae(vae, run.path / "final")
    res = {**reconstruction_figures(vae, eval_u8), "scale_factor": vae.cfg.scale_factor, "train_seconds": round(run.elapsed(), 1)}
    (run.path / "final" / "train_result.json").write_text(json.dumps(res, indent=1))
    run.log(f"final: {json.dumps(res)}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
