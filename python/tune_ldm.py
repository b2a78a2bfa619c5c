"""Fine-tune the LDM through its own sampler against a frozen object counter trained on renders (reward fine-tuning).

    python -m python.tune_ldm --init weights/ldm --counter runs/counter/final --data data/iclevr --run-dir runs/tune
    python -m python.tune_ldm --preset tiny --init DIR --counter DIR --vae DIR --data DIR --run-dir DIR   # for tests

Why: the denoiser's loss scores each noise level alone, while the objects of a sample are decided across the chain's
high-noise steps, so an image with a colour drawn twice costs the loss nothing it can see (weights/ldm/MODEL_CARD.md:
the extra objects). Here the deployed sampler itself (DPM-Solver++, --sample-steps, guidance --guidance
with --apg-norm) runs with gradients from x_T ~ N(0, I) to the final latent, for label sets drawn from the training data,
and a frozen object counter reads that latent (python/models/classifier.py CountClassifier, trained on renders only,
never on a generated latent; never a judge): the cross-entropy of "one of each requested class (--present-weight),
none of any other (--absent-weight), k objects in all (--total-weight)" is back-propagated through every step (as in
DRaFT, Clark et al. 2023, without its truncation: the steps that decide the objects are the first ones). The
ordinary diffusion loss on real latents (--anchor-weight) keeps the model a denoiser of the data. --detach-inputs
keeps the network's Jacobian in x out of the gradient (its product over ten guided steps gave gradient norms of
170-1,000 on the shipped model; 40-70 without it). --kl-weight adds the drift from the initial weights along the
chain (sample_with_grad's `reference`). Measured so far (weights/ldm/MODEL_CARD.md): the counter is gamed
(objects drawn smaller or dropped, then a tinted floor; without the total term, objects drawn larger: accuracy up,
fidelity down, as many extra objects), so no tuned weights are shipped. The held-out
figure (the judge's accuracy and unrequested-object rate on heldout.json, as train_ldm logs it) only watches.

The run folder is train_ldm's (config, log, metrics.jsonl, sample grids, checkpoints with "model" and "ema"), so
`python -m python.ship ldm --run RUN` ships it and `--resume` continues it.
"""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from python.core.diffusion import (
    DEFAULT_APG_NORM,
    DEFAULT_GUIDANCE,
    DPMSolverPP,
    Schedule,
    check_apg_norm,
    guide_outputs,
)
from python.core.errors import UserError, cli
from python.data.dataset import load_condition_file
from python.evaluation.metrics import ldm_probe
from python.models.classifier import load_classifier_for
from python.models.denoiser import load_denoiser, save_denoiser
from python.models.judge import load_judge
from python.models.vae import SHIPPED_VAE, Decoder, load_vae, require_latent_space, vae_digest
from python.training.ema import ema_update
from python.training.latents import load_latents
from python.training.loop import Progress, add_run_options, optimiser_step, resolve_config
from python.training.losses import coeff_tables, count_reward, diffusion_loss, min_snr_weight
from python.training.rundir import RunDir

PRESETS = {
    "tiny": dict(batch=2, anchor_batch=4, steps=4, sample_steps=2, eval_every=2, save_every=1, eval_conditions=4,
                 eval_steps=2, lr=1e-5),
    "full": dict(batch=32, anchor_batch=64, steps=400, sample_steps=10, eval_every=50, save_every=25,
                 eval_conditions=256, eval_steps=10, lr=1e-5),
}


def sample_with_grad(model, schedule: Schedule, cond: torch.Tensor, x_T: torch.Tensor, steps: int,
                     guidance: float, detach_inputs: bool = False, reference=None,
                     apg_norm: float = DEFAULT_APG_NORM):
    """The deployed sampler (DPM-Solver++(2M), the maths of python/core/diffusion.py) with its guidance
    (diffusion.guide_outputs: classifier-free with apg_norm 0, else adaptive projected), every step differentiable:
    the final latent (generator scale). With `detach_inputs` the network sees
    each step's x detached: the final latent's gradient reaches every step's output through the sampler's linear
    updates but not through the network's Jacobian in x, whose product over the chain explodes.

    With a frozen `reference` network, returns (final latent, drift): drift is the mean over the steps of the squared
    distance between the model's conditional and unconditional outputs and the reference's at the chain's own x_t
    (the per-step KL between the two samplers' Gaussian steps, up to a constant per step: the anchor of RL
    fine-tuning of diffusion models, DPOK, Fan et al. 2023), differentiable in the model only."""
    n = len(cond)
    both = torch.cat([cond, torch.zeros_like(cond)])
    sampler, x = DPMSolverPP(schedule, steps), x_T
    drift = x_T.new_zeros(())
    for i, t in enumerate(sampler.timesteps):
        x_in = x.detach() if detach_inputs else x
        x_in = torch.cat([x_in, x_in])  # the conditional and the unconditional pass in one batch
        tt = torch.full((2 * n,), int(t), dtype=torch.long, device=x.device)
        out = model(x_in, tt, both)
        if reference is not None:
            with torch.no_grad():
                ref = reference(x_in.detach(), tt, both)
            drift = drift + F.mse_loss(out.float(), ref.float()) / len(sampler.timesteps)
        a, s = (float(c) for c in schedule.coeffs(int(t)))
        x = sampler.step(guide_outputs(out[:n], out[n:], guidance, x, a, s, schedule.prediction, apg_norm), i, x)
    return (x, drift) if reference is not None else x


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, "tune_ldm", PRESETS, device=True)
    parser.add_argument("--init", type=Path, required=True, help="the LDM folder to fine-tune (e.g. weights/ldm)")
    parser.add_argument("--counter", type=Path, required=True,
                        help="object counter folder (python -m python.train_classifier --counts N)")
    parser.add_argument("--batch", type=int, help="label sets sampled with gradients per step")
    parser.add_argument("--anchor-batch", type=int, help="real latents of the diffusion loss per step")
    parser.add_argument("--anchor-weight", type=float, default=1.0, help="weight of the diffusion loss (0: none)")
    parser.add_argument("--present-weight", type=float, default=2.0, help="requested classes' term")
    parser.add_argument("--absent-weight", type=float, default=1.0, help="other classes' term")
    parser.add_argument("--total-weight", type=float, default=1.0,
                        help="total-count term (its gradient dominates even at 0.1: see the LDM card)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay of the saved weights (0: the weights)")
    parser.add_argument("--sample-steps", type=int, help="sampler steps run with gradients (the deployed count)")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--apg-norm", type=float, default=DEFAULT_APG_NORM,
                        help="adaptive projected guidance's norm cap (0: classifier-free guidance; inf: no cap)")
    parser.add_argument("--kl-weight", type=float, default=0.0,
                        help="weight of the drift from the initial weights along the sampled chain (the mean squared "
                             "output difference at the chain's x_t; 0: none): it holds what the reward does not "
                             "pay for")
    parser.add_argument("--detach-inputs", action="store_true",
                        help="the gradient skips the network's Jacobian in x between steps (see sample_with_grad)")
    parser.add_argument("--min-snr", type=float, default=5.0, help="the diffusion loss's min-SNR gamma (0 disables)")
    parser.add_argument("--p-uncond", type=float, default=0.1, help="the diffusion loss's condition dropout")
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--save-every", type=int, help="checkpoint interval (also at every evaluation)")
    parser.add_argument("--eval-conditions", type=int)
    parser.add_argument("--eval-data", type=Path, help="the data folder whose heldout.json is scored (default --data)")
    parser.add_argument("--eval-steps", type=int)
    args = parser.parse_args(argv)
    for name in ("anchor_weight", "present_weight", "absent_weight", "total_weight", "kl_weight"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    check_apg_norm(args.apg_norm, "--apg-norm")
    cfg = resolve_config(PRESETS[args.preset], args)
    device = torch.device(args.device)
    vae_folder = args.vae or SHIPPED_VAE

    init, init_cfg = load_denoiser(args.init, layout_for="python.tune_ldm")
    require_latent_space(args.init, init_cfg, vae_folder)
    counter = load_classifier_for(args.counter, vae_folder, output="counts").to(device)
    lat = load_latents(args.data, vae_folder)
    if tuple(lat.mean.shape[1:]) != (init.cfg.in_channels, init.cfg.size, init.cfg.size):
        raise UserError(f"--data latents {tuple(lat.mean.shape[1:])} do not fit the denoiser of {args.init}")
    eval_cond = load_condition_file(args.eval_data or args.data, "heldout.json")[: cfg["eval_conditions"]]
    schedule = Schedule(**init_cfg["schedule"])
    cfg.update(denoiser=asdict(init.cfg), schedule=schedule.config(),
               vae_sha=vae_digest(vae_folder))
    run = RunDir(args.run_dir, cfg, args.resume, fixed=("denoiser", "schedule", "vae_sha", "lr", "init", "counter",
                                                      "detach_inputs"))

    torch.manual_seed(args.seed)
    model = init.float().to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    # the initial weights, frozen: what --kl-weight holds the chain's outputs to (never updated, so a resumed run
    # rebuilds it from --init)
    reference = copy.deepcopy(model).requires_grad_(False) if args.kl_weight > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator(device=device).manual_seed(args.seed * 1000003 + 1)
    modules, objects = {"model": model, "ema": ema}, {"opt": opt, "gen": gen}
    step = run.restore(modules, objects) if args.resume else 0
    lat = lat.to(device)
    all_t = torch.arange(schedule.T)
    ca_tab, cs_tab = coeff_tables(schedule, device)
    w_tab = min_snr_weight(schedule, all_t, args.min_snr).to(device)
    judge, decoder = load_judge(args.judge), Decoder(load_vae(vae_folder)).eval()
    shape = (init.cfg.in_channels, init.cfg.size, init.cfg.size)
    run.log(f"tuning {args.init} through {cfg['sample_steps']} guided sampler steps against {args.counter}; "
            f"{len(lat)} real latents for the anchor")
    progress = Progress(run, cfg["steps"], step, every=5, show=("reward",))
    while step < cfg["steps"]:
        idx = torch.randint(0, len(lat), (cfg["batch"],), generator=gen, device=device)
        cond = lat.labels[idx]
        x_T = torch.randn((cfg["batch"], *shape), generator=gen, device=device)
        final = sample_with_grad(model, schedule, cond, x_T, cfg["sample_steps"], args.guidance, args.detach_inputs,
                                 reference, args.apg_norm)
        final, drift = final if reference is not None else (final, torch.zeros(()))
        parts = {}
        reward = count_reward(counter, final, cond, args.present_weight, args.absent_weight, args.total_weight, parts)
        loss, anchor = reward + args.kl_weight * drift, torch.zeros(())
        if args.anchor_weight > 0:
            idx = torch.randint(0, len(lat), (cfg["anchor_batch"],), generator=gen, device=device)
            z0 = lat.sample(idx, gen)
            keep = torch.rand(len(idx), generator=gen, device=device) >= args.p_uncond
            t = torch.randint(0, schedule.T, (len(idx),), generator=gen, device=device)
            eps = torch.randn(z0.shape, generator=gen, device=device)
            anchor = diffusion_loss(model, z0, lat.labels[idx] * keep.float()[:, None], t, eps, (ca_tab, cs_tab),
                                    w_tab, schedule.prediction)[0]
            loss = loss + args.anchor_weight * anchor
        gnorm = optimiser_step(loss, opt, clip=model.parameters())
        step += 1
        ema_update(ema, model, step, args.ema)
        progress.step(step, cfg["batch"], lambda: dict(reward=reward.item(), **parts, anchor=anchor.item(),
                                                       drift=drift.item(), grad_norm=float(gnorm)))
        evaluating = step % cfg["eval_every"] == 0 or step == cfg["steps"]
        if evaluating:
            res, images = ldm_probe(ema, schedule, decoder, judge, eval_cond, cfg["eval_steps"], args.guidance, device,
                                    apg_norm=args.apg_norm)
            run.metrics(step=step, heldout_subset=res, guidance=args.guidance, apg_norm=args.apg_norm,
                        sampler_steps=cfg["eval_steps"])
            progress.write(f"step {step}: accuracy {res['accuracy']:.4f}, unrequested objects in "
                           f"{res['unrequested']:.3f} of {len(eval_cond)} held-out conditions")
            run.sample_grid("heldout", step, images)
        if evaluating or step % cfg["save_every"] == 0:
            run.checkpoint(step, modules, objects)
    progress.close()
    extra = {"schedule": schedule.config(), "vae_sha": cfg["vae_sha"], "tuned_steps": step, "init": str(args.init),
             "train_seconds": round(run.elapsed(), 1)}
    save_denoiser(copy.deepcopy(ema).float().cpu(), run.path / "final", extra)
    run.log(f"saved weights to {run.path / 'final'}")
    print(json.dumps({"final": str(run.path / "final"), "steps": step}))


if __name__ == "__main__":
    main()
