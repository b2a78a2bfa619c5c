"""Train the conditional latent GAN on the VAE's latent cache.

    python -m python.train_gan --data data/iclevr --run-dir runs/gan            # shipped recipe
    python -m python.train_gan --preset tiny --data DIR --vae DIR --run-dir DIR  # seconds, for tests

Hinge loss with a projection discriminator on latents, an auxiliary multi-label head on D (BCE on real
latents), lazy R1 on real latents, EMA of the generator. The generator's class loss comes from a separate
latent classifier trained first on real latents only (phase 0, --cls-steps; saved in the run folder and reused
on resume) and then frozen; --cls-steps 0 uses D's auxiliary head instead (measured too weak: see
models/classifier.py). Two guards against a generator that satisfies the classifier with latents the decoder
does not draw as objects: --cls-noise smooths the classifier (trained on, and applied to, latents plus Gaussian
noise of a random level up to the given std: its decision must rest on what survives noise, not on fine
patterns), and --cls-fake keeps training it during the GAN on real latents (their labels) and generated ones
(no label present, with this weight), so that whatever the generator fakes stops counting as an object
(the multi-label-classifier-as-discriminator idea of Omni-GAN, Zhou et al. 2021). The judge never enters the loss: it only scores the raw and EMA generators' samples
every eval_every steps (metrics.jsonl, samples/).
"""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict

import torch
import torch.nn.functional as F

from python.core.errors import UserError, cli
from python.data.dataset import load_condition_file
from python.models.gan import Discriminator, GANConfig, Generator
from python.models.generators import save_generator
from python.models.judge import judge_score, load_judge
from python.models.sampling import decode, gan_latents
from python.models.vae import SHIPPED_VAE, Decoder, load_vae, vae_digest
from python.training.classifier import train_classifier
from python.training.ema import ema_update
from python.training.latents import load_latents
from python.training.loop import Progress, add_run_options, optimiser_step, resolve_config
from python.training.losses import noise_augment
from python.training.rundir import RunDir

PRESETS = {
    "tiny": dict(g_channels=[16, 16, 16], d_channels=[16, 16, 16], batch=8, steps=6, eval_every=3,
                 eval_conditions=8, cls_steps=4),
    "quick": dict(g_channels=[128, 64, 32], d_channels=[32, 64, 128], batch=64, steps=3000, eval_every=500,
                  eval_conditions=128, cls_steps=1500),
    "full": dict(g_channels=[256, 128, 64], d_channels=[64, 128, 256], batch=128, steps=60000, eval_every=2000,
                 eval_conditions=512, cls_steps=3000),
}


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, "gan", PRESETS, device=True)
    parser.add_argument("--g-channels", type=int, nargs="+")
    parser.add_argument("--d-channels", type=int, nargs="+")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr-g", type=float, default=2e-4)
    parser.add_argument("--lr-d", type=float, default=2e-4)
    parser.add_argument("--aux", type=float, default=1.0, help="weight of D's auxiliary label loss on real latents")
    parser.add_argument("--cls-steps", type=int, help="latent classifier training steps (0: G uses D's aux head)")
    parser.add_argument("--cls-weight", type=float, default=1.0, help="weight of the generator's class loss")
    parser.add_argument("--cls-noise", type=float, default=0.0,
                   help="max std of the Gaussian noise the classifier is trained on and applied with (0: none)")
    parser.add_argument("--cls-fake", type=float, default=0.0,
                   help="keep training the classifier during the GAN, generated latents as 'no object' with this weight (0: frozen)")
    parser.add_argument("--keep", type=int, default=1, help="checkpoints kept in the run folder (one per eval)")
    parser.add_argument("--r1", type=float, default=0.05, help="R1 gamma on real latents (0 disables)")
    parser.add_argument("--r1-every", type=int, default=8)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--eval-conditions", type=int)
    parser.add_argument("--reset-ema", action="store_true", help="on --resume, restart the EMA from the generator")
    args = parser.parse_args(argv)
    cfg = resolve_config(PRESETS[args.preset], args)
    vae_folder = args.vae or SHIPPED_VAE
    device = torch.device(args.device)
    lat = load_latents(args.data, vae_folder).to(device)
    gcfg = GANConfig(latent_channels=lat.mean.shape[1], size=lat.mean.shape[2], g_channels=cfg["g_channels"],
                       d_channels=cfg["d_channels"])
    cfg.update(gan=asdict(gcfg), vae_sha=vae_digest(vae_folder))
    run = RunDir(args.run_dir, cfg, args.resume, fixed=("gan", "vae_sha"))  # learning rates: applied on resume

    torch.manual_seed(args.seed)
    gen, disc = Generator(gcfg).to(device), Discriminator(gcfg).to(device)
    ema = copy.deepcopy(gen).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr_g, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr_d, betas=(0.0, 0.99))
    if args.cls_fake > 0 and not cfg["cls_steps"]:
        raise UserError("--cls-fake needs the latent classifier (--cls-steps > 0)")
    cls = train_classifier(lat, cfg["cls_steps"], 256, args.seed, run, args.cls_noise, device) if cfg["cls_steps"] > 0 else None
    opt_c = None
    if args.cls_fake > 0:  # the classifier goes on training, online: its weights are part of the checkpoint
        cls.requires_grad_(True)
        opt_c = torch.optim.Adam(cls.parameters(), lr=args.lr_d, betas=(0.0, 0.99))
    modules = {"generator": gen, "discriminator": disc, "ema": ema, "classifier": cls if opt_c else None}
    gen_rng = torch.Generator(device=device).manual_seed(args.seed * 1000003)  # its state is in the checkpoint
    objects = {"opt_g": opt_g, "opt_d": opt_d, "opt_c": opt_c, "gen_rng": gen_rng}
    step = run.restore(modules, objects, optional=("classifier", "opt_c", "gen_rng")) if args.resume else 0
    if step:
        for opt, lr in ((opt_g, args.lr_g), (opt_d, args.lr_d), (opt_c, args.lr_d)):  # the command line's rates win
            for group in opt.param_groups if opt else []:
                group["lr"] = lr
        if args.reset_ema:
            ema.load_state_dict(gen.state_dict())
            run.log("EMA restarted from the generator")
    judge, decoder = load_judge(args.judge), Decoder(load_vae(vae_folder)).eval()
    eval_cond = load_condition_file(args.data, "heldout.json")[: cfg["eval_conditions"]]
    run.log(f"GAN: G {sum(p.numel() for p in gen.parameters()) / 1e6:.2f}M, D {sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M "
            f"params, {len(lat)} latents")
    progress = Progress(run, cfg["steps"], step, show=("loss_d", "loss_g"))
    bs = cfg["batch"]
    while step < cfg["steps"]:
        idx = torch.randint(0, len(lat), (bs,), generator=gen_rng, device=device)
        real, cond = lat.sample(idx, gen_rng), lat.labels[idx]
        z = torch.randn(bs, gcfg.z_dim, generator=gen_rng, device=device)
        # discriminator: hinge on realness, BCE on real labels, lazy R1 on real latents
        with torch.no_grad():
            fake = gen(z, cond)
        r1 = args.r1 > 0 and step % args.r1_every == 0
        real.requires_grad_(r1)
        d_real, aux_real = disc(real, cond)
        d_fake, _ = disc(fake, cond)
        loss_d = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean() \
            + args.aux * F.binary_cross_entropy_with_logits(aux_real, cond)
        if r1:
            grad, = torch.autograd.grad(d_real.sum(), real, create_graph=True)
            loss_d = loss_d + args.r1 / 2 * args.r1_every * grad.pow(2).flatten(1).sum(1).mean()
        optimiser_step(loss_d, opt_d)
        if opt_c is not None:  # the classifier: real latents carry their labels, generated ones none
            cls.train()
            logits = cls(noise_augment(torch.cat([real.detach(), fake]), args.cls_noise, gen_rng))
            bce = F.binary_cross_entropy_with_logits(logits, torch.cat([cond, torch.zeros_like(cond)]),
                                                     reduction="none").mean(1)
            loss_c = bce[:bs].mean() + args.cls_fake * bce[bs:].mean()
            optimiser_step(loss_c, opt_c)
            cls.eval()
        # generator: fool the projection head, satisfy the auxiliary classifier
        fake = gen(z, cond)
        d_fake, aux_fake = disc(fake, cond)
        class_logits = cls(noise_augment(fake, args.cls_noise, gen_rng)) if cls is not None else aux_fake
        loss_g = -d_fake.mean() + args.cls_weight * F.binary_cross_entropy_with_logits(class_logits, cond)
        optimiser_step(loss_g, opt_g)
        step += 1
        ema_update(ema, gen, step, args.ema)
        progress.step(step, bs, lambda: dict(loss_d=loss_d.item(), loss_g=loss_g.item(), d_real=d_real.mean().item(),
                                             d_fake=d_fake.mean().item(),
                                             **({"loss_cls": loss_c.item()} if opt_c is not None else {})))
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            raw = judge_score(judge, decode(decoder, gan_latents(gen.eval(), eval_cond, device=device)), eval_cond)
            gen.train()
            images = decode(decoder, gan_latents(ema, eval_cond, device=device))
            res = judge_score(judge, images, eval_cond)
            run.metrics(step=step, heldout_subset={"accuracy": res["accuracy"], "by_objects": res["by_objects"]},
                        heldout_subset_raw={"accuracy": raw["accuracy"], "by_objects": raw["by_objects"]})
            progress.write(f"step {step}: accuracy EMA {res['accuracy']:.4f}, raw {raw['accuracy']:.4f} on "
                      f"{len(eval_cond)} held-out conditions")
            run.sample_grid("heldout", step, images)
            run.checkpoint(step, modules, objects, keep=args.keep)
    progress.close()
    save_generator(ema.cpu(), run.path / "final", {"vae_sha": cfg["vae_sha"], "trained_steps": step,
                                                   "train_seconds": round(run.elapsed(), 1)})
    run.log(f"saved EMA generator to {run.path / 'final'}")
    print(json.dumps({"final": str(run.path / "final"), "steps": step}))


if __name__ == "__main__":
    main()
