"""Train the conditional latent diffusion model on the VAE's latent cache.

    python -m python.train_ldm --data data/iclevr --run-dir runs/ldm                       # shipped recipe
    torchrun --nproc_per_node=2 -m python.train_ldm --data data/iclevr --run-dir runs/ldm  # DDP (gloo / nccl)
    python -m python.train_ldm --preset tiny --data DIR --vae DIR --run-dir DIR             # seconds, for tests

Each step: latents z ~ q(z|x) from the cache (x scale_factor), t ~ U{0..T-1}, x_t = a z + s eps; the
denoiser predicts eps or v; the squared error is weighted by min-SNR-gamma (Hang et al. 2023) so
that no noise level dominates. The condition is dropped (empty set) with probability p_uncond for
classifier-free guidance. EMA weights are what is evaluated and saved. Every eval_every steps the
EMA model samples a fixed condition set (DPM-Solver++, --guidance with --apg-norm), the VAE decodes, the judge scores;
the accuracy goes to metrics.jsonl and a grid to samples/.

--cls-weight W (fine-tuning, with --init): adds W x the mean binary cross-entropy of frozen classifiers
(--cls-classifier; trained on real latents only, e.g. `train_classifier --pixels`; never a judge) on the
x_0 the denoiser predicts, for the conditioned samples with t < --cls-max-t. The one-step student's class
term (python/distill.py) applied along the whole trajectory: the samplers step through these x_0 predictions.

--count-scenes N (with --pooled): a share of each batch (--count-fraction) comes from N fresh renders of 1-5
objects in which a class may repeat, conditioned on their per-class counts (2 = two red cubes). The official data
never repeats a class, so the model has never been shown that one label means one object; the LDM's commonest
error is a requested colour drawn twice. The class tokens' attention cannot see a count (identical tokens split
the softmax and return the same value); the pooled embedding, linear in the condition, can. Sampling is unchanged
(a multi-hot label set is a set of counts of 1).

--repa-weight W: representation alignment (REPA, Yu et al. 2024; python/training/repa.py). A projector of the
hidden tokens after block --repa-layer is pulled towards a frozen latent classifier's maps of the clean latent
(trained on real latents only; --repa-classifier, default the shipped one), W x minus their cosine similarity.
The projector trains with the denoiser and is kept in the checkpoints, not in the shipped weights.

--stop-after MINUTES: a time budget (a lent GPU's device time, a CPU session's end). Once this process has trained
that long it checkpoints, saves final/ (the EMA so far, `stopped_early` in its config) and exits 0; --resume carries
on where it stopped, with the schedule of the whole --steps. SIGTERM or Ctrl-C does the same after the step under
way and exits 128 + the signal's number (143, 130); a second one stops at once.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from python.core.diffusion import DEFAULT_APG_NORM, DEFAULT_GUIDANCE, Schedule, check_apg_norm, x0_eps
from python.core.errors import UserError, cli
from python.core.labels import NUM_CLASSES
from python.core.layout import BANK_FILE, LayoutBank
from python.data.dataset import load_condition_file
from python.data.layout import make_bank
from python.evaluation.metrics import ldm_probe
from python.models.classifier import load_classifier_for
from python.models.denoiser import Denoiser, DenoiserConfig, load_denoiser, save_denoiser
from python.models.judge import load_judge
from python.models.vae import SHIPPED_VAE, Decoder, load_vae, vae_digest
from python.models.weights import lineage
from python.training.ema import ema_update
from python.training.latents import count_latents, load_latents, mixed_batch, with_places
from python.training.loop import Interruption, Progress, add_run_options, optimiser_step, resolve_config
from python.training.losses import class_term, coeff_tables, diffusion_loss, min_snr_weight
from python.training.repa import ClassifierTargets, Projector, alignment_loss
from python.training.rundir import RunDir, restore_checkpoint
from python.training.schedules import warmup_cosine

PRESETS = {
    "tiny": dict(width=32, depth=2, heads=2, batch=8, steps=6, eval_every=3, eval_conditions=8, eval_steps=4,
                 lr=1e-3, warmup=2, layout_bank=8),
    "quick": dict(width=128, depth=4, heads=4, batch=64, steps=2000, eval_every=500, eval_conditions=64,
                  eval_steps=20, lr=5e-4, warmup=100),
    "full": dict(width=128, depth=8, heads=4, batch=128, steps=40000, eval_every=2000, eval_conditions=256,
                 eval_steps=20, lr=4e-4, warmup=1000),
}


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, "ldm", PRESETS, device=True)
    parser.add_argument("--width", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--patch", type=int, default=2)
    parser.add_argument("--cond", choices=("tokens", "sum"), default="tokens")
    parser.add_argument("--pooled", action=argparse.BooleanOptionalAction, default=True,
                   help="with --cond tokens, also add a pooled embedding of the label set to the time embedding")
    parser.add_argument("--token-update", action=argparse.BooleanOptionalAction, default=False,
                        help="the class tokens attend to the patches after each block (two-way; see denoiser.py)")
    parser.add_argument("--layout", action="store_true",
                        help="condition on each object's place too (python/data/layout.py; a data folder written by "
                             "python.make_data, whose scenes can be re-drawn); sampling draws places from the "
                             "renderer's placement prior")
    parser.add_argument("--layout-bank", type=int,
                        help="with --layout: scenes per object count in the placement prior drawn at the start and "
                             "kept in the run folder (default 4096; the tiny preset 8)")
    parser.add_argument("--schedule", choices=("linear", "scaled_linear", "cosine"), default="cosine")
    parser.add_argument("--prediction", choices=("epsilon", "v_prediction"), default="v_prediction")
    parser.add_argument("--min-snr", type=float, default=5.0, help="min-SNR gamma (0 disables)")
    parser.add_argument("--p-uncond", type=float, default=0.1, help="probability of dropping the condition")
    parser.add_argument("--batch", type=int, help="global batch (split across DDP ranks)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint interval (also at every evaluation)")
    parser.add_argument("--eval-conditions", type=int, help="how many heldout.json conditions to score")
    parser.add_argument("--eval-data", type=Path, help="the data folder whose heldout.json the evaluation samples "
                                                        "(default: --data; set it to compare runs on different "
                                                        "training sets on one probe)")
    parser.add_argument("--eval-steps", type=int)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--apg-norm", type=float, default=DEFAULT_APG_NORM,
                        help="the probe's adaptive projected guidance norm cap (0: classifier-free guidance, as the "
                             "runs before 2026-12-05 were probed)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bf16 autocast (default: on for CUDA; off on CPU, where it measured 2.3x slower for this "
                        "model: attention and small matmuls pay the casts)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward (worth it on a GPU)")
    parser.add_argument("--init", type=Path, help="warm-start the weights from a saved LDM folder (e.g. weights/ldm)")
    parser.add_argument("--new-lr-mult", type=float, default=1.0,
                        help="with --init: the weights the init lacks (a pooled embedding, token update) train at this "
                             "x --lr (they start at zero and must catch up with a trained network)")
    parser.add_argument("--cls-weight", type=float, default=0.0,
                   help="class term on the predicted x_0: W x the classifiers' mean BCE (0: none)")
    parser.add_argument("--cls-classifier", type=Path, nargs="+",
                   help="classifier(s) for --cls-weight (train_classifier folders; default: weights/classifier)")
    parser.add_argument("--cls-max-t", type=int, help="class term only where t < this (default: every t)")
    parser.add_argument("--repa-weight", type=float, default=0.0,
                        help="weight of the representation-alignment term (REPA; 0: off; Yu et al. use 0.5)")
    parser.add_argument("--repa-classifier", type=Path,
                        help="the frozen encoder: a latent classifier folder trained on real latents only (default: "
                             "the shipped weights/classifier; never a judge)")
    parser.add_argument("--repa-layer", type=int, default=1,
                        help="the block (0-based) whose patch tokens are aligned (default 1: the second of 8)")
    parser.add_argument("--repa-stage", type=int, default=1,
                        help="the classifier's first stage used as targets, later stages added (default 1)")
    parser.add_argument("--count-scenes", type=int, default=0,
                   help="also train on N fresh renders of 1-5 objects in which a class may repeat, conditioned on "
                        "their per-class counts (needs --pooled: the pooled embedding is what sees a count; 0: none)")
    parser.add_argument("--count-seed", type=int, default=7, help="the count scenes' render stream")
    parser.add_argument("--count-fraction", type=float, default=0.25,
                   help="share of each batch drawn from the count scenes")
    parser.add_argument("--count-workers", type=int, help="processes that render the count scenes (default: all cores)")
    parser.add_argument("--stop-after", type=float, metavar="MINUTES",
                        help="stop once this process has trained this many minutes: checkpoint, save final/ (the EMA "
                             "so far) and exit 0; the run carries on with --resume (a lent GPU's or a session's time)")
    args = parser.parse_args(argv)
    if args.stop_after is not None and not 0 <= args.stop_after < float("inf"):
        raise UserError(f"--stop-after must be a number of minutes >= 0, got {args.stop_after}")
    if args.cls_weight < 0:
        raise UserError(f"--cls-weight must be >= 0, got {args.cls_weight}")
    if not 0 <= args.repa_weight < float("inf"):
        raise UserError(f"--repa-weight must be >= 0, got {args.repa_weight}")
    check_apg_norm(args.apg_norm, "--apg-norm")
    if not 0 < args.new_lr_mult < float("inf"):
        raise UserError(f"--new-lr-mult must be a positive number, got {args.new_lr_mult}")
    if args.new_lr_mult != 1 and not args.init:
        raise UserError("--new-lr-mult applies to the weights an --init lacks; give --init")
    if args.count_scenes:
        if args.count_scenes < 10:
            raise UserError(f"--count-scenes must be 0 (none) or >= 10, got {args.count_scenes}")
        if not 0 < args.count_fraction < 1:
            raise UserError(f"--count-fraction must be in (0, 1), got {args.count_fraction}")
        if args.count_workers is not None and args.count_workers < 1:
            raise UserError(f"--count-workers must be >= 1, got {args.count_workers}")
        if args.layout:
            raise UserError("--count-scenes and --layout do not go together: the count scenes' places are not kept")
        if not (args.pooled and args.cond == "tokens"):
            raise UserError("--count-scenes needs --pooled (and --cond tokens): the class tokens' attention cannot "
                            "tell one object of a class from two, the pooled embedding of the counts can")
    cfg = resolve_config(PRESETS[args.preset], args)
    if cfg.get("bf16") is None:
        cfg["bf16"] = args.device == "cuda"

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else args.device)
    if cfg["batch"] % world:
        raise UserError(f"--batch {cfg['batch']} must be divisible by the number of processes ({world})")

    vae_folder = args.vae or SHIPPED_VAE
    lat = load_latents(args.data, vae_folder)
    schedule = Schedule(args.schedule, prediction=args.prediction)
    dcfg = DenoiserConfig(in_channels=lat.mean.shape[1], size=lat.mean.shape[2], patch=args.patch, width=cfg["width"],
                            depth=cfg["depth"], heads=cfg["heads"], cond=args.cond, pooled=args.pooled,
                            token_update=args.token_update, layout=args.layout)
    if args.layout_bank is not None and not args.layout:
        raise UserError("--layout-bank is the placement prior of a --layout model; give --layout")
    if args.layout:  # each latent's condition row: its multi-hot, then its objects' places (mirror images mirrored)
        lat = with_places(lat, args.data)
    cfg.update(denoiser=asdict(dcfg), schedule=schedule.config(), vae_sha=vae_digest(vae_folder), world=world,
               count_scenes=dict(scenes=args.count_scenes, seed=args.count_seed, fraction=args.count_fraction)
               if args.count_scenes else None,
               repa=dict(weight=args.repa_weight, layer=args.repa_layer, stage=args.repa_stage,
                         classifier=str(args.repa_classifier or "weights/classifier")) if args.repa_weight else None)
    if args.repa_weight and not 0 <= args.repa_layer < dcfg.depth:
        raise UserError(f"--repa-layer must be a block index in 0..{dcfg.depth - 1}, got {args.repa_layer}")
    # the class term's inputs are checked before the run folder is made
    cls_max_t = schedule.T if args.cls_max_t is None else args.cls_max_t
    if not 1 <= cls_max_t <= schedule.T:
        raise UserError(f"--cls-max-t must be in 1..{schedule.T} (the class term applies where t < it), got {cls_max_t}")
    cls_nets = []
    if args.cls_weight > 0:
        cls_nets = [load_classifier_for(c, vae_folder).to(device) for c in args.cls_classifier or [None]]
    repa_targets = ClassifierTargets(load_classifier_for(args.repa_classifier, vae_folder), dcfg.size // dcfg.patch,
                                     args.repa_stage).to(device) if args.repa_weight else None
    cfg["init_from"] = lineage(args.init) if args.init else None  # provenance; a resumed run keeps its own (RunDir)
    run = RunDir(args.run_dir, cfg, args.resume,
                 fixed=("denoiser", "schedule", "vae_sha", "lr", "warmup", "count_scenes", "new_lr_mult", "repa"),
                 defaults={"denoiser": asdict(DenoiserConfig())}) \
        if rank == 0 else None

    torch.manual_seed(args.seed)
    model = Denoiser(dcfg)
    missing = []
    if args.init:
        init, _ = load_denoiser(args.init)
        shape = lambda c: dict(width=c.width, depth=c.depth, heads=c.heads, patch=c.patch, cond=c.cond,  # noqa: E731
                               in_channels=c.in_channels, size=c.size)
        if shape(init.cfg) != shape(dcfg):
            raise UserError(f"--init {args.init}: its denoiser {shape(init.cfg)} does not match this run's {shape(dcfg)}")
        if init.cfg.layout and not dcfg.layout:
            raise UserError(f"--init {args.init}: a layout denoiser (it reads where each object stands); give --layout "
                            "to carry on with it")
        # a pooled embedding, token update or layout input the init lacks starts at zero, so the warm start computes
        # what the init did; any other weight it lacks is an error
        missing = model.load_state_dict(init.state_dict(), strict=False).missing_keys
        plain = Denoiser(replace(dcfg, pooled=False, token_update=False, layout=False)).state_dict().keys()
        if any(k in plain for k in missing):
            raise UserError(f"--init {args.init}: weights missing for {missing}")
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    # REPA's projector trains with the denoiser (its own checkpoint entry) and is not part of the shipped weights
    projector = Projector(dcfg.width, repa_targets.channels).to(device) if repa_targets else None
    new = [p for k, p in model.named_parameters() if k in missing]
    groups = [{"params": [p for k, p in model.named_parameters() if k not in missing]}] + \
        ([{"params": new, "lr": cfg["lr"] * args.new_lr_mult}] if new else []) + \
        ([{"params": list(projector.parameters())}] if projector else [])
    opt = torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=0.01, betas=(0.9, 0.99))
    steps = cfg["steps"]
    sched = warmup_cosine(opt, steps, cfg["warmup"], floor=0.1)
    # the batch generator's state is in the checkpoint (a resumed run draws the batches an uninterrupted one would);
    # with several processes each rank draws its own stream, seeded from the step it resumes at
    gen = torch.Generator(device=device).manual_seed(args.seed * 1000003)
    modules = {"model": model, "ema": ema, **({"projector": projector} if projector else {})}
    objects = {"opt": opt, "sched": sched, "gen": gen if world == 1 else None}
    step = 0
    if args.resume:  # every rank reads the same checkpoint
        step = run.restore(modules, objects, optional=("gen",)) if run else \
            restore_checkpoint(args.run_dir, modules, objects, optional=("gen",))
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    proj = torch.nn.parallel.DistributedDataParallel(projector) if projector and world > 1 else projector
    if args.compile:
        net = torch.compile(net)
    if world > 1:
        gen.manual_seed(args.seed * 1000003 + rank * 7919 + step)
    if args.layout:  # the placement prior the probe (and later every sampler) draws places from, kept with the run
        folder = Path(args.run_dir)
        bank = LayoutBank.load(folder) if (folder / BANK_FILE).exists() else None
        if bank is None:
            bank = make_bank(cfg.get("layout_bank") or 4096, seed=args.seed, workers=1 if world > 1 else None)
            if run:
                bank.save(folder)
        model.layout_bank = ema.layout_bank = bank
    lat = lat.to(device)
    if repa_targets:  # the first 2,048 latents (deterministic, so a resumed run standardises as the first did)
        repa_targets.fit(lat.mean[:2048].float() * lat.scale_factor)
    # the count scenes (if any) are rendered into the run folder once, by rank 0; every rank reads that file
    per_rank = cfg["batch"] // world
    n_count = round(per_rank * args.count_fraction) if args.count_scenes else 0
    count_lat = None
    if n_count:
        if world > 1 and rank:
            dist.barrier()
        count_lat = count_latents(Path(args.run_dir) / "count-latents.npz", args.count_scenes, args.count_seed,
                                  vae_folder, args.count_workers, log=run.log if run else (lambda _: None)).to(device)
        if world > 1 and not rank:
            dist.barrier()
    all_t = torch.arange(schedule.T)
    ca_tab, cs_tab = coeff_tables(schedule, device)
    w_tab = min_snr_weight(schedule, all_t, args.min_snr).to(device)

    judge = load_judge(args.judge) if rank == 0 else None
    decoder = Decoder(load_vae(vae_folder)).eval() if rank == 0 else None
    eval_cond = load_condition_file(args.eval_data or args.data, "heldout.json")[: cfg["eval_conditions"]] \
        if rank == 0 else None
    if run:
        run.log(f"LDM {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {len(lat)} latents, "
                f"world {world}, device {device}" + (f"; {n_count} of each {per_rank} from {len(count_lat)} count-scene "
                                                     f"latents" if n_count else ""))
    progress = Progress(run, steps, step)
    model.train()
    t_start, stopped = time.time(), False
    with Interruption() as interrupt:
        while step < steps:
            # the whole batch is drawn on the training device (cache, noise, tables): no host work per step
            z0, labels = mixed_batch(lat, count_lat, per_rank, n_count, gen)
            keep = torch.rand(per_rank, generator=gen, device=device) >= args.p_uncond
            cond = labels * keep.float()[:, None]
            t = torch.randint(0, schedule.T, (per_rank,), generator=gen, device=device)
            eps = torch.randn(z0.shape, generator=gen, device=device)
            extra = {}  # the terms beside the diffusion loss, as tensors (read off the device only when logged)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["bf16"]):
                loss, x_t, out = diffusion_loss(net, z0, cond, t, eps, (ca_tab, cs_tab), w_tab, schedule.prediction,
                                                **({"feature_layer": args.repa_layer} if projector else {}))
                if projector:
                    out, hidden = out
                    align = alignment_loss(proj(hidden), repa_targets(z0))
                    extra = {"repa": align.detach(), "mse": loss.detach()}
                    loss = loss + args.repa_weight * align
            if cls_nets and (sel := keep & (t < cls_max_t)).any():
                x0 = x0_eps(x_t[sel], out[sel].float(), ca_tab[t][sel], cs_tab[t][sel], schedule.prediction)[0]
                present = cond[sel][:, :NUM_CLASSES].clamp(max=1)  # presence, whatever the count
                cls_term = class_term(cls_nets, x0, present)
                extra = {**extra, "cls": cls_term.detach(), "mse": extra.get("mse", loss.detach())}
                loss = loss + args.cls_weight * cls_term
            gnorm = optimiser_step(loss, opt, sched, clip=model.parameters())
            step += 1
            ema_update(ema, model, step, args.ema)
            progress.step(step, per_rank * world, lambda: dict(loss=loss.item(), grad_norm=float(gnorm),
                                                               lr=sched.get_last_lr()[0],
                                                               **{k: float(v) for k, v in extra.items()}))
            evaluating = step % cfg["eval_every"] == 0 or step == steps
            if run and not evaluating and step % cfg["save_every"] == 0:
                run.checkpoint(step, modules, objects)
            if evaluating:
                if run:
                    res, images = ldm_probe(ema, schedule, decoder, judge, eval_cond, cfg["eval_steps"], args.guidance,
                                            device, apg_norm=args.apg_norm)
                    run.metrics(step=step, heldout_subset=res, guidance=args.guidance, apg_norm=args.apg_norm,
                                sampler_steps=cfg["eval_steps"])
                    progress.write(f"step {step}: accuracy {res['accuracy']:.4f}, unrequested objects in "
                                   f"{res['unrequested']:.3f} of {len(eval_cond)} held-out conditions")
                    run.sample_grid("heldout", step, images)
                    run.checkpoint(step, modules, objects)
                if world > 1:
                    dist.barrier()
            why = _stop_reason(args.stop_after, t_start, interrupt, device, world) if step < steps else None
            if why:
                stopped = True
                if run:
                    if not evaluating and step % cfg["save_every"]:  # else saved above
                        run.checkpoint(step, modules, objects)
                    run.log(f"stopped at step {step} of {steps} ({why}); continue with --resume")
                break
    progress.close()
    if run:
        extra = {"schedule": schedule.config(), "vae_sha": cfg["vae_sha"], "trained_steps": step,
                 **({"init_from": cfg["init_from"]} if cfg.get("init_from") else {}),
                 "train_seconds": round(run.elapsed(), 1), **({"stopped_early": True} if stopped else {})}
        save_denoiser(copy.deepcopy(ema).float().cpu(), run.path / "final", extra)
        run.log(f"saved EMA weights to {run.path / 'final'}")
        print(json.dumps({"final": str(run.path / "final"), "steps": step}))
    if world > 1:
        dist.destroy_process_group()
    if interrupt.requested:  # saved above; the shell sees what stopped it
        sys.exit(interrupt.exit_code)


def _stop_reason(minutes: float | None, t_start: float, interrupt: Interruption, device: torch.device,
                 world: int) -> str | None:
    """Why the loop stops after this step: --stop-after's time is up, or a signal came; None to go on. With several
    processes every rank stops if one would (a rank that stopped alone would leave the others waiting in their next
    all-reduce), so they agree once per step."""
    signum, late = interrupt.signum or 0, int(minutes is not None and time.time() - t_start >= 60 * minutes)
    if world > 1:
        flags = torch.tensor([float(signum), float(late)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, late = (int(v) for v in flags.tolist())
    if signum:
        return f"{signal.Signals(signum).name} received"
    return f"after {minutes:g} min (--stop-after)" if late else None


if __name__ == "__main__":
    main()
