"""Train the VAE on the i-CLEVR training images, then cache the training set's latents.

    python -m python.train_vae --data data/iclevr --run-dir runs/vae            # the shipped recipe
    python -m python.train_vae --preset tiny --data DIR --run-dir DIR            # seconds, for tests

Loss: mean squared error + beta * KL(q(z|x) || N(0, I)) per latent element; beta is small, so the
posterior stays nearly deterministic (a sharp decoder) while the KL keeps the latent space smooth and
bounded for diffusion and the GAN. After training, the training set (and its mirror images) is
encoded once into the latent cache (python/latents.py: posterior mean and std, float16, unscaled,
with labels), and scale_factor = 1 / std of the cached means is stored in config.json, so that the
generators see unit-variance latents z = scale_factor * (mean + std * eps).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from python.core.errors import cli
from python.core.images import rows_grid
from python.data.dataset import heldout_or_train, load_split, to_model_range
from python.evaluation.metrics import psnr
from python.models.vae import VAE, VAEConfig, reconstruct, save_vae
from python.training.latents import load_latents
from python.training.loop import Progress, resolve_config
from python.training.rundir import RunDir
from python.training.schedules import warmup_cosine


PRESETS = {
    "tiny": dict(steps=6, batch=8, eval_every=3, lr=1e-3, channels=[16, 8], eval_images=16),
    "full": dict(steps=12000, batch=64, eval_every=1000, lr=2e-3, channels=[64, 48], eval_images=512),
}


def evaluate(vae: VAE, images_u8: np.ndarray) -> dict:
    vae.eval()
    rec = reconstruct(vae, images_u8)
    vae.train()
    return {"psnr": float(psnr(to_model_range(images_u8), rec).mean())}


@cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/iclevr"))
    p.add_argument("--run-dir", type=Path, default=Path("runs/vae"))
    p.add_argument("--preset", choices=PRESETS, default="full")
    p.add_argument("--arch", choices=("gdn", "kl"), default="gdn")
    p.add_argument("--channels", type=int, nargs="+", help="gdn widths, latent side first (default 64 48)")
    p.add_argument("--kl-channels", type=int, nargs="+", help="kl: diffusers block_out_channels")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--downsample", type=int, default=4, choices=(2, 4, 8))
    p.add_argument("--beta", type=float, default=1e-4, help="KL weight per latent element")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-images", type=int)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-cache", action="store_true", help="skip building the latent cache")
    a = p.parse_args(argv)
    cfg = resolve_config(PRESETS[a.preset], a)
    vcfg = VAEConfig(arch=a.arch, latent_channels=a.latent_channels, downsample=a.downsample,
                       channels=cfg["channels"], **({"kl_channels": a.kl_channels} if a.kl_channels else {}))
    cfg["vae"] = asdict(vcfg)
    run = RunDir(a.run_dir, cfg, a.resume)

    train = load_split(a.data)
    eval_u8 = heldout_or_train(a.data, train).images[: cfg["eval_images"]]
    images_t = torch.from_numpy(np.ascontiguousarray(train.images))

    torch.manual_seed(a.seed)
    vae = VAE(vcfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["lr"], weight_decay=0.0)
    steps = cfg["steps"]
    sched = warmup_cosine(opt, steps)
    gen = torch.Generator().manual_seed(a.seed)
    step = 0
    if a.resume and (ck := run.load()):
        step, weights, state = ck
        vae.load_state_dict(weights["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        run.log(f"resumed at step {step}")
    run.log(f"VAE {vcfg.arch} {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params, latent {vcfg.latent_shape}, "
            f"{len(train)} training images")
    vae.train()
    progress = Progress(run, steps, step, show=("mse", "kl"))
    while step < steps:
        idx = torch.randint(0, len(images_t), (cfg["batch"],), generator=gen)
        x = to_model_range(images_t[idx])
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            rec, mean, logvar = vae(x)
        mse = F.mse_loss(rec.float(), x)
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
        loss = mse + a.beta * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        progress.step(step, len(x), lambda: dict(loss=loss.item(), mse=mse.item(), kl=kl.item(),
                                                  lr=sched.get_last_lr()[0]))
        if step % cfg["eval_every"] == 0 or step == steps:
            res = evaluate(vae, eval_u8)
            run.metrics(step=step, heldout=res)
            progress.write(f"step {step}: held-out PSNR {res['psnr']:.2f} dB")
            run.save(step, {"model": vae.state_dict()},
                     {"opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state()})
            vae.eval()
            Image.fromarray(rows_grid(to_model_range(eval_u8[:16]), reconstruct(vae, eval_u8[:16]))).save(
                run.path / "samples" / f"recon-{step:08d}.png")
            vae.train()
    progress.close()

    vae.eval()
    save_vae(vae, run.path / "final")
    if a.no_cache:  # comparison runs: the scale factor from a subset, no cache
        mean = vae.encode(to_model_range(train.images[:2048]))[0].detach()
    else:  # the cache is keyed by the weights, not config.json, so setting the scale factor after keeps it valid
        mean = load_latents(a.data, run.path / "final").mean.float()
    vae.cfg.scale_factor = float(1.0 / mean.std())
    save_vae(vae, run.path / "final")
    res = {**evaluate(vae, eval_u8), "scale_factor": vae.cfg.scale_factor, "train_seconds": round(run.elapsed(), 1)}
    (run.path / "final" / "train_result.json").write_text(json.dumps(res, indent=1))
    run.log(f"final: {json.dumps(res)}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
