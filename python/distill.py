"""A one-step latent generator distilled from the LDM: the GAN path's speed with the diffusion model's samples.

    python -m python.distill pairs --data D --out ~/runs/pairs --count 65536 --best-of 8   # the teacher's samples
    python -m python.distill train --data D --pairs ~/runs/pairs --run-dir ~/runs/distill   # the student
    python -m python.ship gan --run ~/runs/distill --out weights/gan                        # ships as the GAN

The DPM-Solver++ sampler is deterministic: for a label set, the teacher is a function from the initial noise x_T
to a latent x_0. A student (python/models/one_step.py) learns that function for one call.

Teacher (`pairs`): the LDM (DPM-Solver++, --steps, --guidance with --apg-norm) on label sets drawn from the training set's; with
--best-of N, the candidate that the latent classifier likes best (python/core/best_of.py; trained on real latents only,
no judge). Each shard file holds (labels, x_T, x_0) for --shard conditions, seeded by its index, so an interrupted
run resumes by skipping the shards that exist, and adding shards adds data.

A layout teacher (python/core/layout.py: its condition carries each object's place) is asked for each label set at
places drawn from its placement prior (the shard's seed); the pairs keep the full condition rows, places included,
and the student learns the teacher at those places: it reads them as the teacher does and ships with the teacher's
prior (layouts.npz), so the samplers draw its places as they draw the LDM's.

Student (`train`; `--init` continues another run's student, e.g. on more pairs): a copy of the teacher's
denoiser, called once at t = T-1 on x_T, trained to map x_T to the teacher's x_0 (squared error on latents; EMA
weights). The guidance is in the targets, so the student needs no unconditional pass: one network call per image. --filter keeps only
the pairs whose x_0 the latent classifier reads as exactly the requested objects: the student then learns the
teacher where the teacher succeeds. Squared error alone
gives the average of what the student cannot yet predict (blurred objects); --adv-weight adds the GAN's
projection discriminator on latents (python.models.gan.Discriminator, hinge loss), with the teacher's latents as
the real ones, weighted adaptively against the regression term (python/training/losses.py adaptive_weight). --cls-weight adds a
frozen latent classifier's binary cross-entropy for the requested labels on the student's latents (a classifier
trained on real latents only; use another one than the best-of selector, --cls-classifier, or selection would
read a network the student learnt to please; several are averaged, and a pixel one, train_classifier --pixels,
reads the latent through the frozen VAE decoder). No judge in the loss: the judge scores the held-out accuracy logged
every --eval-every steps.

The student is saved as a generator of kind "distilled" (python/models/generators.py): export, runtime, server,
bench and eval_gen --model gan use it as they use the GAN, with z = x_T flattened (z_dim = C x H x W).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from python.core.best_of import best_of as select_best
from python.core.best_of import candidate_seed
from python.core.diffusion import DEFAULT_APG_NORM, DEFAULT_GUIDANCE, Schedule, check_apg_norm
from python.core.errors import UserError, cli
from python.core.labels import NUM_CLASSES
from python.core.noise import initial_noise
from python.data.dataset import load_condition_file, training_label_sets
from python.models.classifier import load_classifier_for
from python.models.denoiser import SHIPPED_LDM, load_denoiser
from python.models.gan import Discriminator, GANConfig
from python.models.generators import generator_config, load_generator, save_generator
from python.models.judge import judge_score, load_judge, topk_hits
from python.models.one_step import OneStep
from python.models.sampling import decode, gan_latents, ldm_latents
from python.models.vae import SHIPPED_VAE, Decoder, load_vae
from python.training.ema import ema_update
from python.training.loop import Progress, add_run_options, optimiser_step
from python.training.losses import adaptive_weight, class_term
from python.training.rundir import RunDir, load_checkpoint
from python.training.schedules import warmup_cosine

# ---------------------------------------------------------------------------------------------------- teacher


def teacher_shard(model, schedule: Schedule, cond: np.ndarray, seed: int, steps: int, guidance: float,
                  best_of: int = 1, classifier=None,
                  apg_norm: float = DEFAULT_APG_NORM) -> tuple[np.ndarray, np.ndarray]:
    """(x_T, x_0) for each condition: the initial noise of the kept candidate and the latent it became."""
    shape = (model.cfg.in_channels, model.cfg.size, model.cfg.size)
    run = lambda k: ldm_latents(model, schedule, cond, "dpmpp", steps, guidance,  # noqa: E731
                                seed=candidate_seed(seed, k), apg_norm=apg_norm).numpy()
    if best_of == 1:
        return initial_noise(candidate_seed(seed, 0), len(cond), shape), run(0)
    if classifier is None:
        raise UserError("--best-of needs the latent classifier (weights/classifier)")
    with torch.no_grad():  # the classifier scores the label set (a layout row's places are not its business)
        x0, chosen = select_best(best_of, run, lambda z: classifier(torch.from_numpy(z)).numpy(),
                                 np.asarray(cond)[:, :NUM_CLASSES])
    noises = np.stack([initial_noise(candidate_seed(seed, k), len(cond), shape) for k in range(best_of)])
    return noises[chosen, np.arange(len(cond))], x0


def make_pairs(args) -> None:
    check_apg_norm(args.apg_norm, "--apg-norm")
    ldm_dir = args.ldm or SHIPPED_LDM
    model, cfg = load_denoiser(ldm_dir)
    schedule = Schedule(**cfg["schedule"])
    classifier = load_classifier_for(args.classifier, args.vae or SHIPPED_VAE) if args.best_of > 1 else None
    train_sets = training_label_sets(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"ldm": str(Path(ldm_dir).resolve()), "vae_sha": cfg.get("vae_sha"), "steps": args.steps,
            "guidance": args.guidance, "best_of": args.best_of, "shard": args.shard, "seed": args.seed,
            **({"apg_norm": args.apg_norm} if args.apg_norm else {}),  # classifier-free folders read as before
            **({"layout": True} if model.cfg.layout else {})}
    meta_file = args.out / "pairs.json"
    if meta_file.exists() and json.loads(meta_file.read_text()) != meta:
        raise UserError(f"{args.out} holds pairs made with other settings ({meta_file}); use another --out")
    meta_file.write_text(json.dumps(meta, indent=1))
    shards = -(-args.count // args.shard)
    for i in tqdm(range(shards), unit="shard"):
        f = args.out / f"pairs-{i:05d}.npz"
        if f.exists():
            continue
        rng = np.random.default_rng([args.seed, i])
        cond = train_sets[rng.integers(0, len(train_sets), args.shard)]
        seed = args.seed * 1_000_000 + i
        if model.cfg.layout:  # the places the teacher is asked for, drawn from its prior; kept in the pairs
            cond = model.layout_bank.condition_rows(cond, seed=seed)
        t0 = time.time()
        x_T, x_0 = teacher_shard(model, schedule, cond, seed=seed, steps=args.steps,
                                 guidance=args.guidance, best_of=args.best_of, classifier=classifier,
                                 apg_norm=args.apg_norm)
        tmp = args.out / f".pairs-{i:05d}.tmp.npz"
        np.savez(tmp, cond=cond, x_T=x_T.astype(np.float16), x_0=x_0.astype(np.float16))
        os.replace(tmp, f)
        tqdm.write(f"{f.name}: {args.shard} pairs in {time.time() - t0:.1f} s")


def load_pairs(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    files = sorted(folder.glob("pairs-*.npz"))
    if not (folder / "pairs.json").exists() or not files:
        raise UserError(f"{folder}: no teacher pairs (make them with `python -m python.distill pairs --out {folder}`)")
    parts = [np.load(f) for f in files]
    return json.loads((folder / "pairs.json").read_text()), {
        k: torch.from_numpy(np.concatenate([p[k] for p in parts]).astype(np.float32)) for k in ("cond", "x_T", "x_0")}


# ---------------------------------------------------------------------------------------------------- student


def _warm_start(src: Path, student: OneStep, ema: OneStep, disc) -> None:
    """Student (and EMA, and discriminator when the source has one) from another run's latest checkpoint or from
    a saved student folder (e.g. weights/gan): more teacher pairs, same student."""
    src = Path(src)
    if ck := load_checkpoint(src):
        weights = ck[1]
        gen_sd, ema_sd, disc_sd = weights.get("generator"), weights.get("ema"), weights.get("disc")
    elif (src / "config.json").exists() and (src / "generator.safetensors").exists():
        saved = load_generator(src)[0]
        if not isinstance(saved, OneStep):
            raise UserError(f"--init {src}: a GAN generator, not a distilled student; nothing to warm-start from")
        gen_sd = ema_sd = saved.state_dict()
        disc_sd = None
    else:
        raise UserError(f"--init {src}: neither a run folder with a checkpoint nor a student folder "
                        "(config.json + generator.safetensors)")
    if gen_sd is None or ema_sd is None:
        raise UserError(f"--init {src}: its checkpoint has no student weights (generator/ema)")
    want = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in gen_sd.items()}
    if want != have:
        raise UserError(f"--init {src}: its student is not this teacher's architecture "
                        f"({len(have)} tensors; differing: {sorted(set(want.items()) ^ set(have.items()))[:4]})")
    student.load_state_dict(gen_sd)
    ema.load_state_dict(ema_sd)
    if disc is not None and disc_sd is not None:
        disc.load_state_dict(disc_sd)


@torch.no_grad()
def classifier_agrees(classifier, pairs: dict[str, torch.Tensor], batch: int = 1024) -> torch.Tensor:
    """Per pair, whether the latent classifier's top k (k = objects requested) is exactly the requested set in the
    teacher's x_0: the official metric's all-hit case, read from the latent without decoding and without a judge."""
    x_0 = pairs["x_0"]
    logits = torch.cat([classifier(x_0[i:i + batch]) for i in range(0, len(x_0), batch)])
    hits, total = topk_hits(logits, pairs["cond"][:, :NUM_CLASSES])
    return torch.from_numpy(hits == total)


@torch.no_grad()
def mse_to_teacher(student: OneStep, pairs: dict[str, torch.Tensor], batch: int = 256) -> float:
    """Mean squared error of the student's latents to the teacher's x_0 over `pairs` (load_pairs' tensors)."""
    total = 0.0
    for i in range(0, len(pairs["cond"]), batch):
        fake = student(pairs["x_T"][i:i + batch].flatten(1), pairs["cond"][i:i + batch])
        total += (fake - pairs["x_0"][i:i + batch]).square().sum().item()
    return total / pairs["x_0"].numel()


def train(args) -> None:
    meta, pairs = load_pairs(args.pairs)
    teacher, tcfg = load_denoiser(Path(meta["ldm"]) if Path(meta["ldm"]).exists() else args.ldm)
    if pairs["cond"].shape[1] != teacher.cfg.cond_dim:
        made = "a layout teacher (label sets and places)" if meta.get("layout") else "a teacher of label sets alone"
        raise UserError(f"{args.pairs}: its pairs were made with {made}, {pairs['cond'].shape[1]} numbers per "
                        f"condition; the teacher found ({meta['ldm']} or --ldm) reads {teacher.cfg.cond_dim}: give "
                        "--ldm the LDM the pairs came from")
    vae_dir = args.vae or SHIPPED_VAE
    pairs_count = len(pairs["cond"])
    if args.filter:
        keep = classifier_agrees(load_classifier_for(args.classifier, vae_dir), pairs)
        if not keep.any():
            raise UserError(f"--filter: the latent classifier {args.classifier or 'weights/classifier'} agrees with none "
                            f"of the {pairs_count} pairs in {args.pairs} (an untrained classifier, or one for other latents?); nothing to train on")
        pairs = {k: v[keep] for k, v in pairs.items()}
    cfg = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
    torch.manual_seed(args.seed)
    student = OneStep(teacher.cfg, tcfg["schedule"])
    cfg.update(**generator_config(student), vae_sha=tcfg.get("vae_sha"), teacher=meta, pairs_count=pairs_count,
               pairs_kept=len(pairs["cond"]))
    run = RunDir(args.run_dir, cfg, args.resume, fixed=("distilled", "vae_sha", "lr", "lr_schedule"))
    student.denoiser.load_state_dict(teacher.state_dict())
    if teacher.cfg.layout:  # its places are the teacher's prior, kept with the run (python.ship ships it)
        student.layout_bank = teacher.layout_bank
        student.layout_bank.save(run.path)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, args.steps) if args.lr_schedule == "cosine" else None
    cls_nets = []
    if args.cls_weight > 0:
        cls_nets = [load_classifier_for(c, vae_dir) for c in args.cls_classifier or [None]]
        run.log(f"class loss: {args.cls_weight} x the mean BCE of the classifier(s) "
                f"{', '.join(str(c) for c in args.cls_classifier or ['weights/classifier'])}")
    disc = d_opt = None
    if args.adv_weight > 0:
        disc = Discriminator(GANConfig(latent_channels=teacher.cfg.in_channels, size=teacher.cfg.size))
        d_opt = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.0, 0.99))
    if args.init and not (args.resume and (run.path / "latest").exists()):
        _warm_start(args.init, student, ema, disc)
        run.log(f"warm start from {args.init}")
    # a schedule or a discriminator switched on at a resume starts afresh
    gen = torch.Generator().manual_seed(args.seed)  # its state is in the checkpoint
    modules = {"generator": student, "ema": ema, "disc": disc}
    objects = {"opt": opt, "sched": sched, "d_opt": d_opt, "gen": gen}
    step = run.restore(modules, objects, optional=("sched", "disc", "d_opt", "gen")) if args.resume else 0
    decoder, judge = Decoder(load_vae(vae_dir)).eval(), load_judge(args.judge)
    eval_cond = load_condition_file(args.data, "heldout.json")[: args.eval_conditions]
    # the first --val-pairs are never trained on (the over-fitting gauge); shards are appended, so they stay the
    # same pairs when the folder grows
    n = len(pairs["cond"]) - args.val_pairs
    if n < 1:
        raise UserError(f"--val-pairs {args.val_pairs} leaves no training pairs (the folder holds {pairs_count}"
                        + (f", {cfg['pairs_kept']} of them kept by --filter)" if args.filter else ")"))
    if args.filter:
        run.log(f"--filter: kept {cfg['pairs_kept']} of {pairs_count} pairs, those whose x_0 the latent classifier "
                f"reads as exactly the requested objects")
    val = {k: v[:args.val_pairs] for k, v in pairs.items()}
    pairs = {k: v[args.val_pairs:] for k, v in pairs.items()}
    run.log(f"student {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params, {n} teacher pairs "
            f"(steps {meta['steps']}, guidance {meta['guidance']}, APG norm {meta.get('apg_norm', 0)}, "
            f"best of {meta['best_of']}), {args.val_pairs} held out")
    progress = Progress(run, args.steps, step)
    student.train()
    while step < args.steps:
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        x_T, x_0, cond = pairs["x_T"][idx], pairs["x_0"][idx], pairs["cond"][idx]
        fake = student(x_T.flatten(1), cond)  # a layout student reads the places too
        labels = cond[:, :NUM_CLASSES]  # the classifiers and the discriminator read the label set alone
        loss = reg = (fake - x_0).square().mean()
        extra = {}
        if cls_nets:
            cls_term = class_term(cls_nets, fake, labels)
            loss = loss + args.cls_weight * cls_term
            extra["cls"] = cls_term.item()
        if disc is not None:
            disc.requires_grad_(False)
            adv = -disc(fake, labels)[0].mean()
            disc.requires_grad_(True)
            w = args.adv_weight * adaptive_weight(reg, adv, student.denoiser.out.weight)
            loss = loss + w * adv
            extra.update(adv=adv.item(), adv_w=w.item())
        if extra:  # the regression term beside the others, when there are others
            extra["reg"] = reg.item()
        gnorm = optimiser_step(loss, opt, sched, clip=student.parameters())
        if disc is not None:  # after the student's step, whose backward needs the discriminator as it was
            d_loss = (torch.relu(1 - disc(x_0, labels)[0]).mean() +
                      torch.relu(1 + disc(fake.detach(), labels)[0]).mean())
            optimiser_step(d_loss, d_opt)
            extra["d_loss"] = d_loss.item()
        step += 1
        ema_update(ema, student, step, args.ema)
        progress.step(step, args.batch, lambda: dict(loss=loss.item(), grad_norm=float(gnorm),
                                                  lr=opt.param_groups[0]["lr"], **extra))
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                images = decode(decoder, gan_latents(ema, eval_cond, seed=0))
            res = judge_score(judge, images, eval_cond)
            # the EMA's squared error to the teacher on pairs it never trained on (compare `reg`)
            val_mse = {"val_mse": mse_to_teacher(ema, val)} if args.val_pairs else {}
            run.metrics(step=step, heldout_subset={"accuracy": res["accuracy"], "by_objects": res["by_objects"]},
                        **val_mse)
            progress.write(f"step {step}: accuracy {res['accuracy']:.4f} on {len(eval_cond)} held-out conditions (EMA)")
            run.sample_grid("heldout", step, images)
            run.checkpoint(step, modules, objects)
    progress.close()
    save_generator(copy.deepcopy(ema).float(), run.path / "final", {"vae_sha": cfg["vae_sha"], "trained_steps": step})
    run.log(f"saved EMA student to {run.path / 'final'}")


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("pairs", help="sample the teacher: (labels, x_T, x_0) shards")
    pp.add_argument("--data", type=Path, default=Path("data/iclevr"), help="dataset whose training label sets to use")
    pp.add_argument("--out", type=Path, required=True)
    pp.add_argument("--ldm", type=Path, help="teacher LDM folder (default: weights/ldm)")
    pp.add_argument("--vae", type=Path, help="VAE folder the classifier must match (default: weights/vae)")
    pp.add_argument("--classifier", type=Path, help="latent classifier for --best-of (default: weights/classifier)")
    pp.add_argument("--count", type=int, default=65536)
    pp.add_argument("--shard", type=int, default=1024)
    pp.add_argument("--steps", type=int, default=10)
    pp.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    pp.add_argument("--apg-norm", type=float, default=DEFAULT_APG_NORM,
                    help="the teacher's adaptive projected guidance norm cap (0: classifier-free guidance)")
    pp.add_argument("--best-of", type=int, default=1)
    pp.add_argument("--seed", type=int, default=0)
    pp.set_defaults(func=make_pairs)
    pt = sub.add_parser("train", help="train the one-step student on the pairs")
    add_run_options(pt, "distill", vae="VAE for the held-out figure (default: weights/vae)")
    pt.add_argument("--pairs", type=Path, required=True)
    pt.add_argument("--ldm", type=Path, help="teacher LDM, when the path in pairs.json is gone (default: weights/ldm)")
    pt.add_argument("--steps", type=int, default=20000)
    pt.add_argument("--batch", type=int, default=128)
    pt.add_argument("--lr", type=float, default=1e-4)
    pt.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                    help="cosine: 2%% warm-up, then decay to 0.05 x --lr at --steps")
    pt.add_argument("--ema", type=float, default=0.999)
    pt.add_argument("--adv-weight", type=float, default=0.0, help="adversarial term (x the adaptive scale; 0: none)")
    pt.add_argument("--cls-weight", type=float, default=0.0,
                    help="class term: x BCE of a frozen latent classifier on the student's latents (0: none)")
    pt.add_argument("--cls-classifier", type=Path, nargs="+",
                    help="classifier(s) for --cls-weight, their BCEs averaged (default: weights/classifier; better "
                         "others than the best-of selector; a --pixels one reads the decoded image)")
    pt.add_argument("--val-pairs", type=int, default=0,
                    help="hold out the first N pairs and log the EMA's squared error on them at each evaluation")
    pt.add_argument("--eval-every", type=int, default=1000)
    pt.add_argument("--eval-conditions", type=int, default=256)
    pt.add_argument("--filter", action="store_true",
                    help="train only on the pairs whose x_0 the latent classifier reads as exactly the requested "
                         "objects (the teacher's successes; no judge involved)")
    pt.add_argument("--classifier", type=Path, help="latent classifier for --filter (default: weights/classifier)")
    pt.add_argument("--init", type=Path, help="warm-start from a student run folder or a saved student (weights/gan)")
    pt.set_defaults(func=train)
    args = parser.parse_args(argv)
    for name in ("count", "shard", "steps", "best_of", "batch", "eval_every", "eval_conditions"):
        if getattr(args, name, 1) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("val_pairs", "adv_weight", "cls_weight"):
        if getattr(args, name, 0) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    args.func(args)


if __name__ == "__main__":
    main()
