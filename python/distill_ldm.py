"""A few-step LDM distilled from the guided LDM: the default sampling's quality at a finer grid, in fewer plain steps.

    python -m python.distill_ldm trajectories --data D --out ~/runs/traj --count 16384   # the teacher's paths
    python -m python.distill_ldm train --data D --trajectories ~/runs/traj --run-dir ~/runs/fewstep
    python -m python.ship ldm --run ~/runs/fewstep --out weights/ldm_fewstep             # a denoiser folder

Why: the shipped LDM at ten steps reads 0.90 with the default guidance and 0.93-0.94 at 25-30 (the model card): a
good share of its errors are those of the ten-step discretisation, not of the network. Progressive distillation
(Salimans & Ho 2022) teaches a student one deterministic DDIM step that lands where the teacher's several steps land;
guided distillation (Meng et al. 2023) folds the guidance into the student, so it needs one network call per step.

Teacher (`trajectories`): the LDM with its guidance (APG --guidance / --apg-norm, classifier guidance --class-scale
with --class-iters on the guide classifier, trained on real latents only; never a judge) on DDIM with
--teacher-steps trailing timesteps (deterministic), for label sets drawn from the training set's. Every
teacher_steps / steps steps its latent is kept: x at the student's grid (DDIM with --steps trailing timesteps, a
subset of the teacher's), from x_T to x_0. Shards (cond, xs, t) are written atomically and seeded by their index, so
an interrupted run resumes by skipping the shards that exist.

Student (`train`): the teacher's denoiser (--init: the LDM, or a run folder or student to continue), called with the
condition alone (guidance 1: no unconditional pass, no classifier). For a kept pair (x at t, x at the next grid
point t') its target is the output with which one DDIM step from x_t lands on x_t' exactly
(python.core.diffusion.ddim_target); squared error, EMA weights. The held-out figure (the judge's accuracy and
unrequested-object rate on heldout.json[:--eval-conditions], the student sampled as deployed: DDIM, --steps,
guidance 1) is logged only; nothing selects on it.

Sampling the student: any LDM path with `--sampler ddim --steps 10 --guidance 1 --apg-norm 0 --class-scale 0`.

Measured (weights/ldm/MODEL_CARD.md, twentieth session): 8,192 paths of the shipped LDM at 30 steps, 4,000 student
steps of 128 on the 2-core CPU: 0.860 on heldout.json[:256] against the teacher's 0.893 at 10 steps with its
default guidance (and 0.92 at 50): far from its targets still, so not shipped; a method for a lent GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from python.core.diffusion import (
    DDIM,
    DEFAULT_APG_NORM,
    DEFAULT_CLASS_ITERS,
    DEFAULT_CLASS_SCALE,
    DEFAULT_GUIDANCE,
    Schedule,
    check_apg_norm,
    check_class_iters,
    check_class_scale,
    ddim_target,
)
from python.core.errors import UserError, cli
from python.core.noise import initial_noise
from python.data.dataset import load_condition_file, training_label_sets
from python.evaluation.metrics import ldm_probe
from python.models.classifier import load_class_grad
from python.models.denoiser import SHIPPED_LDM, Denoiser, denoiser_config, load_denoiser, save_denoiser
from python.models.judge import load_judge
from python.models.sampling import ldm_latents
from python.models.vae import SHIPPED_VAE, Decoder, load_vae
from python.training.ema import ema_update
from python.training.loop import Interruption, Progress, add_run_options, optimiser_step
from python.training.rundir import RunDir, load_checkpoint
from python.training.schedules import warmup_cosine

SHIPPED_GUIDE = SHIPPED_LDM.parent / "guide"


def student_grid(schedule: Schedule, teacher_steps: int, steps: int) -> np.ndarray:
    """The student's DDIM timesteps followed by -1 (x_0): every k-th of the teacher's, k = teacher_steps / steps."""
    if steps < 1 or teacher_steps < steps or teacher_steps % steps:
        raise UserError(f"--teacher-steps ({teacher_steps}) must be a multiple of --steps ({steps}), both >= 1, so "
                        "that the student's grid is a subset of the teacher's")
    k = teacher_steps // steps
    teacher, student = DDIM(schedule, teacher_steps), DDIM(schedule, steps)
    assert np.array_equal(teacher.timesteps[::k], student.timesteps), "trailing grids must nest"
    return np.concatenate([student.timesteps, [-1]]).astype(np.int64)


# ---------------------------------------------------------------------------------------------------- teacher


def teacher_paths(model, schedule: Schedule, cond: np.ndarray, seed: int, teacher_steps: int, steps: int,
                  guidance: float, apg_norm: float, class_grad, class_scale: float, class_iters: int,
                  device="cpu") -> np.ndarray:
    """(steps + 1, N, C, H, W): the teacher's latent at each student grid point, x_T first, x_0 last."""
    shape = (model.cfg.in_channels, model.cfg.size, model.cfg.size)
    k = teacher_steps // steps
    kept = [initial_noise(seed, len(cond), shape)]  # the x_T that ldm_latents draws for `seed`

    def keep(i, x, rows):  # one chunk (batch = all rows): x is every row's latent after step i
        if (i + 1) % k == 0:
            kept.append(np.array(x, np.float32))

    ldm_latents(model, schedule, cond, "ddim", teacher_steps, guidance, seed=seed, on_step=keep, batch=len(cond),
                device=device, apg_norm=apg_norm, class_grad=class_grad if class_scale else None,
                class_scale=class_scale,
                class_iters=class_iters)
    return np.stack(kept)


def make_trajectories(args) -> None:
    check_apg_norm(args.apg_norm, "--apg-norm")
    check_class_scale(args.class_scale, "--class-scale")
    check_class_iters(args.class_iters, "--class-iters")
    model, cfg = load_denoiser(args.ldm or SHIPPED_LDM, args.device, layout_for="python.distill_ldm")
    schedule = Schedule(**cfg["schedule"])
    grid = student_grid(schedule, args.teacher_steps, args.steps)
    class_grad = load_class_grad(args.guide or SHIPPED_GUIDE, args.vae or SHIPPED_VAE).to(args.device) \
        if args.class_scale else None
    train_sets = training_label_sets(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"ldm": str(Path(args.ldm or SHIPPED_LDM).resolve()), "vae_sha": cfg.get("vae_sha"),
            "teacher_steps": args.teacher_steps, "steps": args.steps, "grid": grid.tolist(),
            "guidance": args.guidance, "apg_norm": args.apg_norm, "class_scale": args.class_scale,
            "class_iters": args.class_iters, "shard": args.shard, "seed": args.seed}
    meta_file = args.out / "trajectories.json"
    if meta_file.exists() and json.loads(meta_file.read_text()) != meta:
        raise UserError(f"{args.out} holds trajectories made with other settings ({meta_file}); use another --out")
    meta_file.write_text(json.dumps(meta, indent=1))
    for i in tqdm(range(-(-args.count // args.shard)), unit="shard"):
        f = args.out / f"paths-{i:05d}.npz"
        if f.exists():
            continue
        cond = train_sets[np.random.default_rng([args.seed, i]).integers(0, len(train_sets), args.shard)]
        t0 = time.time()
        with torch.no_grad():
            xs = teacher_paths(model, schedule, cond, args.seed * 1_000_000 + i, args.teacher_steps, args.steps,
                               args.guidance, args.apg_norm, class_grad, args.class_scale, args.class_iters,
                               args.device)
        tmp = args.out / f".paths-{i:05d}.tmp.npz"
        np.savez(tmp, cond=cond, xs=xs, t=grid)
        os.replace(tmp, f)
        tqdm.write(f"{f.name}: {args.shard} paths in {time.time() - t0:.1f} s")


def load_trajectories(folder: Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(meta, cond (M, 24), xs (steps + 1, M, C, H, W)) from a trajectories folder."""
    folder = Path(folder)
    files = sorted(folder.glob("paths-*.npz"))
    if not (folder / "trajectories.json").exists() or not files:
        raise UserError(f"{folder}: no teacher trajectories (make them with "
                        f"`python -m python.distill_ldm trajectories --out {folder}`)")
    meta = json.loads((folder / "trajectories.json").read_text())
    parts = [np.load(f) for f in files]
    for f, p in zip(files, parts):
        if p["t"].tolist() != meta["grid"]:
            raise UserError(f"{f}: its grid {p['t'].tolist()} is not the folder's {meta['grid']}")
    cond = torch.from_numpy(np.concatenate([p["cond"] for p in parts]).astype(np.float32))
    return meta, cond, torch.from_numpy(np.concatenate([p["xs"] for p in parts], axis=1))


# ---------------------------------------------------------------------------------------------------- student


def _init_student(src: Path | None):
    """(student, ema, config) from a run folder's latest checkpoint (another student run's, continued on other
    trajectories) or a denoiser folder (default: the shipped LDM)."""
    if src is not None and (ck := load_checkpoint(Path(src))):
        cfg = json.loads((Path(src) / "config.json").read_text())
        if "denoiser" not in cfg or "schedule" not in cfg:
            raise UserError(f"--init {src}: a run folder, but not of a denoiser (its config.json has no 'denoiser')")
        model = Denoiser(denoiser_config(cfg, Path(src)))
        ema = copy.deepcopy(model)
        model.load_state_dict(ck[1]["model"])
        ema.load_state_dict(ck[1]["ema"])
        return model, ema, cfg
    model, cfg = load_denoiser(src or SHIPPED_LDM, layout_for="python.distill_ldm")
    return model, copy.deepcopy(model), cfg


def train(args) -> None:
    meta, cond_all, xs = load_trajectories(args.trajectories)
    model, ema, tcfg = _init_student(args.init)
    schedule = Schedule(**tcfg["schedule"])
    grid = np.asarray(meta["grid"])
    if tcfg.get("vae_sha") != meta["vae_sha"]:
        raise UserError(f"--init reads VAE {tcfg.get('vae_sha')}, the trajectories VAE {meta['vae_sha']}")
    shape = (model.cfg.in_channels, model.cfg.size, model.cfg.size)
    if tuple(xs.shape[2:]) != shape:
        raise UserError(f"--init's denoiser reads latents {shape}, the trajectories hold {tuple(xs.shape[2:])}")
    n_steps = len(grid) - 1
    sampling = {"sampler": "ddim", "steps": n_steps, "guidance": 1.0, "apg_norm": 0.0, "class_scale": 0.0}
    # what python.ship needs to ship the run as a denoiser folder (its architecture, schedule, latent space, and
    # how it is meant to be sampled)
    cfg = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
           "denoiser": asdict(model.cfg), "schedule": schedule.config(), "vae_sha": tcfg.get("vae_sha"),
           "sampling": sampling, "distilled_from": meta["ldm"]}
    run = RunDir(args.run_dir, cfg, resume=args.resume, fixed=("trajectories",))
    device = torch.device(args.device)
    model.to(device).train()
    ema.to(device)
    ema.eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = warmup_cosine(opt, args.steps, args.warmup, floor=0.1)
    gen = torch.Generator().manual_seed(args.seed * 1000003)
    modules, objects = {"model": model, "ema": ema}, {"opt": opt, "sched": sched, "gen": gen}
    step = run.restore(modules, objects) if args.resume and (run.path / "latest").exists() else 0
    # per grid point: (a, s) at t and at the next point (alpha_bar 1 at x_0)
    ab = np.concatenate([schedule.alpha_bar, [1.0]])  # index -1 reads 1.0
    a = torch.tensor(np.sqrt(ab[grid]), dtype=torch.float32, device=device)
    s = torch.tensor(np.sqrt(1.0 - ab[grid]), dtype=torch.float32, device=device)
    t_grid = torch.from_numpy(grid).to(device)
    n_paths = xs.shape[1]
    judge = load_judge(args.judge)
    decoder = Decoder(load_vae(args.vae or SHIPPED_VAE)).eval()
    eval_cond = load_condition_file(args.eval_data or args.data, "heldout.json")[: args.eval_conditions]
    run.log(f"student {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; {n_paths} teacher paths x "
            f"{n_steps} steps ({meta['teacher_steps']} teacher steps, guidance {meta['guidance']}, class scale "
            f"{meta['class_scale']})")

    def probe():
        res, images = ldm_probe(ema, schedule, decoder, judge, eval_cond, n_steps, 1.0, device, apg_norm=0.0,
                                sampler="ddim")
        run.metrics(step=step, heldout_subset=res, sampler="ddim", sampler_steps=n_steps, guidance=1.0)
        progress.write(f"step {step}: accuracy {res['accuracy']:.4f}, unrequested {res['unrequested']:.3f}")
        run.sample_grid("heldout", step, images)

    progress = Progress(run, args.steps, step)
    if step == 0 and args.eval_every:
        probe()
    with Interruption() as interrupt:
        while step < args.steps:
            m = torch.randint(0, n_paths, (args.batch,), generator=gen)
            j = torch.randint(0, n_steps, (args.batch,), generator=gen)
            x_t, x_next, cond = (v.to(device, non_blocking=True) for v in (xs[j, m], xs[j + 1, m], cond_all[m]))
            j = j.to(device)
            view = lambda v: v[:, None, None, None]  # noqa: E731
            tgt = ddim_target(x_t, x_next, view(a[j]), view(s[j]), view(a[j + 1]), view(s[j + 1]),
                              schedule.prediction)
            loss = (model(x_t, t_grid[j], cond) - tgt).square().mean()
            gnorm = optimiser_step(loss, opt, sched, clip=model.parameters())
            step += 1
            ema_update(ema, model, step, args.ema)
            progress.step(step, args.batch, lambda: dict(loss=loss.item(), grad_norm=float(gnorm),
                                                         lr=sched.get_last_lr()[0]))
            if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                probe()
            if step % args.save_every == 0 or step == args.steps or interrupt.requested:
                run.checkpoint(step, modules, objects)
            if interrupt.requested:
                run.log(f"stopped at step {step} of {args.steps}; continue with --resume")
                break
    progress.close()
    extra = {"schedule": schedule.config(), "vae_sha": tcfg.get("vae_sha"), "trained_steps": step,
             "distilled_from": meta["ldm"], "sampling": sampling, "train_seconds": round(run.elapsed(), 1)}
    save_denoiser(copy.deepcopy(ema).float().cpu(), run.path / "final", extra)
    run.log(f"saved EMA weights to {run.path / 'final'}")
    if interrupt.requested:
        raise SystemExit(interrupt.exit_code)


@cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("trajectories", help="the teacher's latents along the student's grid")
    p.add_argument("--data", type=Path, default=Path("data/iclevr"),
                   help="dataset folder (its train.json's label sets)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ldm", type=Path, help="teacher denoiser folder (default: weights/ldm)")
    p.add_argument("--guide", type=Path, help="classifier guidance's classifier (default: weights/guide)")
    p.add_argument("--vae", type=Path, help="VAE folder (default: weights/vae)")
    p.add_argument("--count", type=int, default=16384, help="trajectories in all (rounded up to shards)")
    p.add_argument("--shard", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-steps", type=int, default=30)
    p.add_argument("--steps", type=int, default=10, help="the student's steps")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--apg-norm", type=float, default=DEFAULT_APG_NORM)
    p.add_argument("--class-scale", type=float, default=DEFAULT_CLASS_SCALE)
    p.add_argument("--class-iters", type=int, default=DEFAULT_CLASS_ITERS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the teacher runs")
    p.set_defaults(func=make_trajectories)
    p = add_run_options(sub.add_parser("train", help="the few-step student"), "distill_ldm", device=True)
    p.add_argument("--trajectories", type=Path, required=True)
    p.add_argument("--eval-data", type=Path, help="folder with heldout.json (default: --data)")
    p.add_argument("--init", type=Path, help="denoiser folder or run folder to start from (default: weights/ldm)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--eval-every", type=int, default=500, help="0: no held-out figure")
    p.add_argument("--eval-conditions", type=int, default=256)
    p.add_argument("--save-every", type=int, default=250)
    p.set_defaults(func=train)
    args = parser.parse_args(argv)
    for name in ("count", "shard", "batch", "eval_conditions", "save_every", "teacher_steps", "steps"):
        if getattr(args, name, 1) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if getattr(args, "eval_every", 0) < 0:
        raise UserError(f"--eval-every must be >= 0, got {args.eval_every}")
    args.func(args)


if __name__ == "__main__":
    main()
