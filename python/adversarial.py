"""The GAN path trained against real data: a one-step generator and a discriminator on the frozen LDM's features.

    python -m python.adversarial --data D --init weights/gan --run-dir ~/runs/adv   # fine-tune the one-step student
    python -m python.ship gan --run ~/runs/adv --out weights/gan                     # ship it as the GAN path

Latent adversarial diffusion distillation (LADD, Sauer et al. 2024) in this project's latent space. The generator
is the one-step student (python/models/one_step.py: the LDM's denoiser called once at t = T-1 on a noise latent).
The discriminator reads a latent the way the LDM does: the latent is noised to a random t <= --d-t-max, the
frozen LDM denoiser runs on it with the label set, and small trainable heads read its token features after the
blocks in --d-layers; each head gives a real/fake logit per token (8 x 8) and one for the whole image (pooled
features), both conditioned on the label set by a projection (the inner product of the head's features with an
embedding of the set; Miyato & Koyama 2018). Hinge loss. Matching-aware (--mismatch, Reed et al. 2016): real latents
under a label set one object off (dropped, added, swapped for an object of the same colour or shape) are fakes too,
so that realism alone does not satisfy the heads; the objects must be the ones asked for. The real latents are the
training images' (the latent cache, q(z|x) samples), so the generator is pulled towards the data, not towards the
teacher's samples: a teacher that draws a requested colour twice cannot be what the student imitates here.
Noising is what keeps the game stable without a gradient penalty (LADD): at high t the heads see layout and
objects, at low t edges and texture.

Distribution matching (--dmd-weight, DMD / DMD2, Yin et al. 2024) is the second objective, alone (--adv-weight 0)
or beside the heads: a copy of the LDM (the "fake score") is trained online on the generator's latents with the
LDM's own loss, and each generated latent is moved along the difference between that copy's clean prediction and
the frozen, guided LDM's at a random noise level in --dmd-t-range: the gradient of KL(generator || guided LDM),
mode-seeking, so a blurred average of two layouts is pushed to one of them rather than kept. A narrower range
(e.g. 20 500) asks the LDM about edges and texture only and leaves the layout to the generator.

--count-weight W (with --counter, an object counter trained on renders only: python.train_classifier --counts)
adds W x the counter's cross-entropy of "as many objects as requested". The judges are multi-label classifiers and
cannot see a requested object drawn twice; the counter can, and reads the shipped generator's images as holding
more objects than were asked for. Measured: the generator meets the term by fading every object, not by dropping the
extra one (weights/gan/MODEL_CARD.md, runs dmdc1-dmdc2); kept as an option for runs that measure what bounds it.

A layout LDM as teacher (python/core/layout.py: its condition row carries each object's place) makes a layout
student: its rows carry the places too (a student of a plain LDM given as --init grows the layout input, zero at
first), the real latents come with their own places (recovered from the renderer, python/data/layout.py) and the
fakes are asked for the same sets at the same places, so teacher, fake score and the heads' frozen features all read
where each object is to stand; the heads' projections and the classifiers read the label set alone. The student
ships with its teacher's placement prior and every sampler draws the places from it, as for the LDM.

No regression to the teacher and no classifier in the generator's loss by default: the adversarial term is what
makes the image. --cls-weight adds a frozen latent classifier's cross-entropy (trained on real latents only, never
a judge, and better another than the best-of selector) for runs that measure what it adds. No judge in any loss or
selection: the judge scores --eval-conditions held-out conditions for the log only, and the run's final EMA
(after --steps, fixed in advance) is what gets shipped.

SIGTERM or Ctrl-C checkpoints after the step under way, saves final/ (`stopped_early` in its config) and exits
128 + the signal's number; --resume carries on. A second one stops at once.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from python.core.diffusion import (
    DEFAULT_APG_NORM,
    DEFAULT_CLASS_ITERS,
    DEFAULT_GUIDANCE,
    Schedule,
    add_noise,
    check_apg_norm,
    check_class_iters,
    check_class_scale,
    descend_x0,
    guide,
    guide_projected,
    x0_eps,
)
from python.core.errors import UserError, cli
from python.core.labels import COLORS, NUM_CLASSES
from python.data.dataset import load_condition_file, to_model_range
from python.evaluation.fidelity import contrast, reference_renders, sharpness
from python.evaluation.metrics import object_rates
from python.models.classifier import SHIPPED_CLASSIFIER, SHIPPED_GUIDE, load_class_grad, load_classifier_for
from python.models.counter import SHIPPED_COUNTER, count_figures, load_counter
from python.models.denoiser import SHIPPED_LDM, Denoiser, load_denoiser
from python.models.generators import SHIPPED_GAN, generator_config, load_generator, save_generator
from python.models.judge import judge_score, load_judge
from python.models.one_step import OneStep
from python.models.sampling import decode, gan_latents
from python.models.vae import SHIPPED_VAE, Decoder, load_vae, require_latent_space
from python.models.weights import lineage
from python.training.ema import ema_update
from python.training.latents import load_latents, with_places
from python.training.loop import Interruption, Progress, add_run_options, optimiser_step, resolve_config
from python.training.losses import class_term, coeff_tables, count_reward, diffusion_loss, min_snr_weight
from python.training.rundir import RunDir, load_checkpoint

PRESETS = {
    "tiny": dict(batch=4, steps=6, eval_every=3, save_every=3, eval_conditions=4, lr=1e-4, d_lr=1e-4,
                 head_width=16, d_layers=[0, 1], d_warmup=1, d_steps=2, mismatch=1.0, fake_lr=1e-4),
    "full": dict(batch=32, steps=3000, eval_every=250, save_every=250, eval_conditions=256, lr=1e-5, d_lr=2e-4,
                 head_width=64, d_layers=[1, 3, 5, 7], d_warmup=300, d_steps=2, mismatch=1.0, fake_lr=1e-5),
}


class Head(nn.Module):
    """Token features (N, L, d) of one block + label set (N, 24) -> logits (N, L + 1): one real/fake logit per token
    (is this patch realistic?) and, last, one for the whole image (does the image hold this label set?). The label
    set enters both by a projection (Miyato & Koyama 2018); the image logit's projection reads features pooled over
    every token, since a set one object off (an extra or a missing object) differs from the right one at a few
    tokens only, which per-token logits average away."""

    def __init__(self, d: int, width: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.body = nn.Sequential(nn.Conv2d(d, width, 3, 1, 1), nn.GroupNorm(min(8, width), width), nn.LeakyReLU(0.2),
                                  nn.Conv2d(width, width, 3, 1, 1), nn.LeakyReLU(0.2))
        self.out = nn.Conv2d(width, 1, 1)
        self.out_image = nn.Linear(2 * width, 1)
        # a small MLP of the multi-hot set, not a sum of class embeddings: it can weigh the set's size and its pairs
        self.embed = nn.Sequential(nn.Linear(num_classes, width), nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, f: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        n, L, d = f.shape
        g = int(round(L ** 0.5))
        h = self.body(self.norm(f).transpose(1, 2).reshape(n, d, g, g))  # (N, w, g, g)
        e_tok, e_img = self.embed(cond).chunk(2, dim=1)  # 2 x (N, w)
        tokens = self.out(h)[:, 0] + (h * e_tok[:, :, None, None]).sum(1)  # (N, g, g)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)  # (N, 2w): mean and max over the tokens
        image = self.out_image(pooled)[:, 0] + (pooled * torch.cat([e_img, e_img], dim=1)).sum(1)  # (N,)
        return torch.cat([tokens.flatten(1), image[:, None]], dim=1)  # (N, L + 1)


def hinge(logits: list[torch.Tensor], sign: float) -> torch.Tensor:
    """The discriminator's hinge loss on every head's logits (N, L + 1), sign +1 for real, -1 for fake: the tokens'
    mean and the image logit's mean weigh the same."""
    return torch.stack([F.relu(1 - sign * o[:, :-1]).mean() + F.relu(1 - sign * o[:, -1]).mean()
                        for o in logits]).mean() / 2


def generator_adv(logits: list[torch.Tensor]) -> torch.Tensor:
    """The generator's side: minus the heads' logits, tokens and image weighed as in `hinge`."""
    return -torch.stack([o[:, :-1].mean() + o[:, -1].mean() for o in logits]).mean() / 2


class ClassifierFeatures(nn.Module):
    """A frozen latent classifier (python.models.classifier.LatentClassifier, trained on real latents only) read as
    the discriminator's feature network: the output of each of its conv stages (conv, batch norm, ReLU) as tokens
    (N, H * W, C). Its features are about which objects are there, which the LDM's are not (a linear probe on the
    LDM's pooled block features reads the label set at 0.56 top-k; see weights/gan/MODEL_CARD.md). It takes no t
    and no label set: the set reaches the heads only through their projections."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        if not hasattr(classifier, "features") or not isinstance(classifier.features, nn.Sequential) or \
                hasattr(classifier, "decoder"):
            raise UserError("--d-features classifier takes a latent classifier (train_classifier without --pixels)")
        self.net = classifier.eval().requires_grad_(False)
        mods = list(classifier.features)
        self.stage_ends = [i for i, m in enumerate(mods) if isinstance(m, nn.ReLU)]  # (N, C, H, W) after each
        self.widths = [next(m.out_channels for m in reversed(mods[:i]) if isinstance(m, nn.Conv2d))
                       for i in self.stage_ends]

    @property
    def depth(self) -> int:
        return len(self.stage_ends)

    def features(self, x, t, cond, layers) -> list[torch.Tensor]:
        out, ends = [], {self.stage_ends[i]: i for i in layers}
        for i, m in enumerate(self.net.features[: self.stage_ends[max(layers)] + 1]):
            x = m(x)
            if i in ends:
                out.append(x.flatten(2).transpose(1, 2))  # (N, H * W, C)
        return out


class FeatureDiscriminator(nn.Module):
    """Heads on a frozen network's features: the LDM denoiser's blocks at a noised latent, or a latent classifier's
    stages (ClassifierFeatures). The network is held outside the module's state (it is saved elsewhere: the shipped
    LDM, a classifier folder), so checkpoints carry the heads only."""

    def __init__(self, backbone: nn.Module, layers: list[int], width: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        dims = backbone.widths if isinstance(backbone, ClassifierFeatures) else \
            [backbone.cfg.width] * backbone.cfg.depth  # one width per block (or stage)
        depth = len(dims)
        if not layers or any(not 0 <= i < depth for i in layers):
            raise UserError(f"--d-layers must be block indices in 0..{depth - 1}, got {layers}")
        self.layers = sorted(set(layers))
        object.__setattr__(self, "backbone", backbone.eval().requires_grad_(False))
        self.heads = nn.ModuleList(Head(dims[i], width, num_classes) for i in self.layers)
        self.num_classes = num_classes

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
        return self.score(self.backbone.features(x_t, t, cond, self.layers), cond)

    def score(self, feats: list[torch.Tensor], cond: torch.Tensor) -> list[torch.Tensor]:
        """Per head, the token and image logits (N, L + 1) of features the frozen network computed."""
        labels = cond[:, : self.num_classes]  # a layout row's places reach the heads through the features only
        return [head(f, labels) for head, f in zip(self.heads, feats)]


def mismatched(cond: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each label set changed by one object, a hard negative for the discriminator: a present object dropped (the
    image then holds an object the set does not ask for), an absent one added (the image lacks one it asks for), or
    one replaced by an absent object of the same colour or the same shape (colour bound to the wrong shape). Drops
    need two or more objects; a one-object set gets an addition or a replacement instead."""
    out = cond.clone()
    kinds = torch.randint(0, 3, (len(cond),), generator=gen).tolist()
    picks = torch.rand(len(cond), 2, generator=gen).tolist()
    for i, (kind, (u, v)) in enumerate(zip(kinds, picks)):
        present = out[i].nonzero().flatten().tolist()
        absent = (out[i] == 0).nonzero().flatten().tolist()
        if kind == 0 and len(present) < 2:
            kind = 1 + int(u < 0.5)
        p = present[int(u * len(present))]
        if kind == 0:
            out[i, p] = 0
        elif kind == 1:
            out[i, absent[int(v * len(absent))]] = 1
        else:  # class index = shape * len(COLORS) + colour
            near = [c for c in absent if c % len(COLORS) == p % len(COLORS) or c // len(COLORS) == p // len(COLORS)]
            out[i, p], out[i, near[int(v * len(near))]] = 0, 1
    return out


def noised(x: torch.Tensor, t: torch.Tensor, tables, gen: torch.Generator) -> torch.Tensor:
    """x_t for clean latents x at timesteps t, `tables` the schedule's (a_t, s_t) for every t."""
    ca, cs = tables
    return add_noise(x, torch.randn(x.shape, generator=gen), ca[t], cs[t])


def dmd_loss(fake: torch.Tensor, cond: torch.Tensor, teacher: Denoiser, fake_score: Denoiser, guidance: float,
             t_range: tuple[int, int], tables, prediction: str, gen: torch.Generator,
             apg_norm: float = 0.0, class_grad=None, class_scale: float = 0.0, class_iters: int = 1) -> torch.Tensor:
    """Distribution matching (DMD, Yin et al. 2024): the generator's latents noised to t ~ U{t_range}, then the
    difference of two denoisers' clean-latent predictions there: the frozen LDM with guidance (classifier-free, or
    adaptive projected with apg_norm > 0: the data's score, as the deployed sampler guides it) and `fake_score`, a
    copy of it trained online on the generator's own latents (their score). Its gradient moves each latent along fake - real, which is the gradient
    of KL(generator || guided LDM) (mode-seeking: towards the LDM's sharp modes, not their blurred mean), normalised
    per sample by the mean |latent - real prediction| as in DMD. A squared error to the moved latent carries that
    gradient; its value is not a distance worth reading, its gradient is. apg_norm > 0: the LDM guided by adaptive
    projected guidance with that norm cap (python/core/diffusion.py guide_projected) instead. class_scale > 0: the
    guided prediction then moved by classifier guidance, class_grad(x_0, cond) (a ClassifierGradient: the label
    classifier's and the total counter's loss), class_iters descent steps (diffusion.descend_x0): the LDM as the
    deployed sampler guides it by default."""
    ca, cs = tables
    with torch.no_grad():
        t = torch.randint(t_range[0], t_range[1], (len(fake),), generator=gen)
        x_t = add_noise(fake, torch.randn(fake.shape, generator=gen), ca[t], cs[t])
        both = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)]))
        if apg_norm:
            real_x0 = guide_projected(x0_eps(x_t, both[: len(fake)], ca[t], cs[t], prediction)[0],
                                      x0_eps(x_t, both[len(fake):], ca[t], cs[t], prediction)[0], guidance, apg_norm)
        else:
            real_x0 = x0_eps(x_t, guide(both[: len(fake)], both[len(fake):], guidance), ca[t], cs[t], prediction)[0]
        if class_scale:
            labels = cond[:, :NUM_CLASSES]  # the classifier reads the label set alone (a layout row has places too)
            real_x0 = descend_x0(real_x0, lambda x0: class_grad(x0, labels), class_scale, class_iters)
        fake_x0 = x0_eps(x_t, fake_score(x_t, t, cond), ca[t], cs[t], prediction)[0]
        scale = (fake - real_x0).abs().mean((1, 2, 3), keepdim=True).clamp(min=1e-4)
        step = (fake_x0 - real_x0) / scale
    return 0.5 * F.mse_loss(fake, (fake - step).detach())


def _student(init: Path | None, teacher: Denoiser, tcfg: dict, vae_dir: Path) -> OneStep:
    """The generator to fine-tune: a saved one-step student (a weights folder such as weights/gan), or, with no
    --init, the teacher itself called once."""
    if init is None:
        student = OneStep(teacher.cfg, tcfg["schedule"])
        student.denoiser.load_state_dict(teacher.state_dict())
        return student
    student, cfg = load_generator(init)
    if not isinstance(student, OneStep):
        raise UserError(f"--init {init}: a {cfg.get('kind')} generator; this trainer fine-tunes a one-step "
                        "student (kind 'distilled', e.g. weights/gan)")
    require_latent_space(init, cfg, vae_dir)
    if student.cfg.layout and not teacher.cfg.layout:
        raise UserError(f"--init {init}: a layout student (it reads where each object stands); its teacher (--ldm) "
                        "must be a layout LDM too")
    if teacher.cfg.layout and not student.cfg.layout:
        # a student of a plain LDM carried on against a layout LDM: the layout input starts at zero (python.train_ldm
        # --init does the same), so the first step computes what the init did; any other weight it lacks is an error
        grown = OneStep(replace(student.denoiser.cfg, layout=True), tcfg["schedule"])
        missing = grown.denoiser.load_state_dict(student.denoiser.state_dict(), strict=False).missing_keys
        if any(not k.startswith("layout_in.") for k in missing):
            raise UserError(f"--init {init}: its denoiser is not the layout LDM's shape (weights missing for {missing})")
        student = grown
    if student.cfg.layout:
        student.layout_bank = teacher.layout_bank  # the places the student is asked for are the teacher's prior
    return student.float().train()


def _warm_start_heads(disc: nn.Module, source: Path, spec: dict) -> None:
    """Load the heads of another run's checkpoint (a run folder: its newest checkpoint that loads, as a resume
    would read it; or one ckpt-N folder) into `disc`, after checking that run's discriminator is this one
    (backbone, features, layers, width)."""
    source = Path(source)
    is_run = (source / "latest").exists()
    run_cfg = (source if is_run else source.parent) / "config.json"
    heads = None
    if is_run:
        heads = load_checkpoint(source)[1].get("disc")
    elif (source / "disc.safetensors").exists():
        heads = load_file(str(source / "disc.safetensors"))
    if heads is None or not run_cfg.exists():
        raise UserError(f"--init-disc {source}: not a python.adversarial run folder or checkpoint (expected "
                        "disc.safetensors in it or in the folder its `latest` names, and the run's config.json)")
    theirs = json.loads(run_cfg.read_text()).get("discriminator", {})
    keys = ("backbone", "features", "layers", "head_width")
    if any(theirs.get(k) != spec[k] for k in keys):
        raise UserError(f"--init-disc {source}: its discriminator {({k: theirs.get(k) for k in keys})} is not this "
                        f"run's {({k: spec[k] for k in keys})}")
    disc.load_state_dict(heads)


def train(args, cfg: dict) -> tuple[Path, int]:
    teacher, tcfg = load_denoiser(args.ldm or SHIPPED_LDM)
    layout = teacher.cfg.layout  # a layout LDM: teacher, fake score, heads' backbone and student read the places too
    vae_dir = args.vae or SHIPPED_VAE
    require_latent_space(args.ldm or SHIPPED_LDM, tcfg, vae_dir)
    schedule = Schedule(**tcfg["schedule"])
    if not 1 <= cfg["d_t_max"] <= schedule.T:
        raise UserError(f"--d-t-max must be in 1..{schedule.T}, got {cfg['d_t_max']}")
    if layout and cfg["mismatch"] > 0:
        raise UserError("--mismatch changes a label set by one object, which a layout LDM's condition (the set and each "
                        "object's place) does not take; give --mismatch 0 with a layout teacher")
    probe = args.eval_data or args.data  # the folder whose heldout.json the log reads (one probe across training sets)
    eval_cond = load_condition_file(probe, "heldout.json")[: cfg["eval_conditions"]]  # read before any run folder
    lat = load_latents(args.data, vae_dir)
    if layout:  # real latents under their own places; the fakes are asked for the same sets at the same places
        lat = with_places(lat, args.data)
    torch.manual_seed(args.seed)
    student = _student(args.init, teacher, tcfg, vae_dir)
    if cfg["d_features"] == "classifier":
        if not args.d_classifier:
            raise UserError("--d-features classifier needs --d-classifier FOLDER (a latent classifier trained on real "
                            "latents, not weights/classifier: that one is the best-of selector)")
        if Path(args.d_classifier).resolve() == SHIPPED_CLASSIFIER.resolve():
            raise UserError(f"--d-classifier {args.d_classifier} is the best-of selector; a network the generator is "
                            "trained against must not also pick its samples. Train another: python -m "
                            "python.train_classifier ... --out FOLDER")
        backbone = ClassifierFeatures(load_classifier_for(args.d_classifier, vae_dir))
        feature_source = args.d_classifier
    else:
        backbone, feature_source = teacher, args.ldm or SHIPPED_LDM
    disc = FeatureDiscriminator(backbone, cfg["d_layers"], cfg["head_width"], teacher.cfg.num_classes)
    cls_nets = [load_classifier_for(c, vae_dir) for c in args.cls_classifier or [None]] if args.cls_weight > 0 else []
    if not 0 <= args.count_weight < float("inf"):
        raise UserError(f"--count-weight must be >= 0, got {args.count_weight}")
    if args.count_weight > 0 and not args.counter:
        raise UserError("--count-weight needs --counter FOLDER (python -m python.train_classifier --counts N)")
    counter = load_classifier_for(args.counter, vae_dir, output="counts").eval().requires_grad_(False) \
        if args.count_weight > 0 else None
    use_adv, use_dmd = cfg["adv_weight"] > 0, cfg["dmd_weight"] > 0
    if not (use_adv or use_dmd):
        raise UserError("--adv-weight 0 and --dmd-weight 0 leave the generator no objective against the data; "
                        "give one of them a weight > 0")
    check_apg_norm(cfg["dmd_apg_norm"], "--dmd-apg-norm")
    check_class_scale(cfg["dmd_class_scale"], "--dmd-class-scale")
    check_class_iters(cfg["dmd_class_iters"], "--dmd-class-iters")
    dmd_grad = None
    if cfg["dmd_class_scale"]:  # the label classifier and total counter of the LDM's classifier guidance
        if not use_dmd:
            raise UserError("--dmd-class-scale guides the DMD term's LDM, which --dmd-weight 0 does not use")
        dmd_grad = load_class_grad(args.dmd_guide, vae_dir).eval()
    lo, hi = cfg["dmd_t_range"]
    if not 0 <= lo < hi <= schedule.T:
        raise UserError(f"--dmd-t-range must be two timesteps 0 <= LOW < HIGH <= {schedule.T}, got {lo} {hi}")
    cfg.update(**generator_config(student), vae_sha=tcfg.get("vae_sha"),
               init_from=lineage(args.init) if args.init else None,
               objective="+".join(name for name, on in (("adversarial", use_adv), ("dmd", use_dmd)) if on),
               discriminator={"backbone": cfg["d_features"], "features": str(feature_source), "layers": disc.layers,
                              "head_width": cfg["head_width"], "t_max": cfg["d_t_max"],
                              "mismatch": cfg["mismatch"]} if use_adv else None,
               dmd={"guidance": cfg["dmd_guidance"], "t_range": [lo, hi], "fake_lr": cfg["fake_lr"],
                    **({"apg_norm": cfg["dmd_apg_norm"]} if cfg["dmd_apg_norm"] else {}),
                    **({"class_scale": cfg["dmd_class_scale"], "class_iters": cfg["dmd_class_iters"],
                        "count_weight": dmd_grad.count_weight, "guide": str(args.dmd_guide)} if dmd_grad else {})}
               if use_dmd else None,
               count_term={"weight": args.count_weight, "counter": str(args.counter)} if counter else None)
    if args.init_disc:  # checked before the run folder is made; a resumed run's own heads replace these below
        if not use_adv:
            raise UserError("--init-disc warm-starts the discriminator's heads, which --adv-weight 0 does not use")
        _warm_start_heads(disc, args.init_disc, cfg["discriminator"])
    run = RunDir(args.run_dir, cfg, args.resume, fixed=("distilled", "vae_sha", "discriminator", "dmd", "count_term"))
    if layout:  # the placement prior travels with the run, for python.ship (the student's samplers draw from it)
        student.layout_bank.save(run.path)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=cfg["lr"], betas=(0.0, 0.99))
    d_opt = torch.optim.Adam(disc.parameters(), lr=cfg["d_lr"], betas=(0.0, 0.99))
    gen = torch.Generator().manual_seed(args.seed)
    modules, objects = {"generator": student, "ema": ema}, {"opt": opt, "gen": gen}
    if use_adv:
        modules["disc"], objects["d_opt"] = disc, d_opt
    if use_dmd:  # the generator's own score: the LDM's copy, trained online on the generator's latents (DMD)
        fake_score = copy.deepcopy(teacher).train().requires_grad_(True)
        f_opt = torch.optim.AdamW(fake_score.parameters(), lr=cfg["fake_lr"], weight_decay=0.0)
        modules["fake_score"], objects["f_opt"] = fake_score, f_opt
        w_tab = min_snr_weight(schedule, torch.arange(schedule.T), args.min_snr)
    step = run.restore(modules, objects) if args.resume else 0
    if args.init_disc and not step:
        run.log(f"discriminator heads warm-started from {args.init_disc}")
    tables = coeff_tables(schedule)  # (a_t, s_t) for every t
    decoder, judge = Decoder(load_vae(vae_dir)).eval(), load_judge(args.judge)
    image_counter = load_counter()[0] if (SHIPPED_COUNTER / "config.json").exists() else None
    # the sharpness figures' reference: one fresh render per held-out condition (cached in that folder's cache)
    real = to_model_range(reference_renders(probe, "heldout.json", eval_cond, 0))
    real_contrast, real_sharpness = float(contrast(real).mean()), float(sharpness(real).mean())
    reads = "LDM" if cfg["d_features"] == "ldm" else f"classifier {feature_source}"
    run.log(f"generator {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params"
            f"{' from ' + str(args.init) if args.init else ' (the LDM called once)'}; "
            + (f"discriminator heads {sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M params on blocks "
               f"{disc.layers} of the frozen {reads} at t <= {cfg['d_t_max']} (x{cfg['adv_weight']:g}); "
               if use_adv else "")
            + (f"distribution matching against the LDM at guidance {cfg['dmd_guidance']:g}"
               + (f" (adaptive projected, norm cap {cfg['dmd_apg_norm']:g})" if cfg["dmd_apg_norm"] else "")
               + (f", classifier guidance {cfg['dmd_class_scale']:g} (count term {dmd_grad.count_weight:g}, "
                  f"{cfg['dmd_class_iters']} descent steps)" if dmd_grad else "")
               + f", t in [{lo}, {hi}) "
               f"(x{cfg['dmd_weight']:g}); " if use_dmd else "")
            + f"{len(lat)} real latents")
    batch, z_dim, t_max = cfg["batch"], student.cfg.z_dim, cfg["d_t_max"]

    def log_heldout(at: int) -> None:
        with torch.no_grad():
            latents = gan_latents(ema, eval_cond, seed=0)
            images = decode(decoder, latents)
        res, rates = judge_score(judge, images, eval_cond), object_rates(judge, images, eval_cond)
        sharp = {"contrast_ratio": float(contrast(images).mean()) / real_contrast,
                 "sharpness_ratio": float(sharpness(images).mean()) / real_sharpness}
        if image_counter is not None:  # the evaluation's counter (weights/counter; nothing is trained against it)
            sharp.update(count_figures(image_counter, images, eval_cond))
        if counter is not None:  # the count term's own reading (what it is trained against: a log, not evidence)
            with torch.no_grad():
                counted = counter(latents)[1].argmax(1).float()
            sharp["counter_surplus"] = float((counted > torch.as_tensor(eval_cond).sum(1)).float().mean())
        run.metrics(step=at, heldout_subset={"accuracy": res["accuracy"], "by_objects": res["by_objects"],
                                             "unrequested": rates["unrequested"], **sharp})
        progress.write(f"step {at}: accuracy {res['accuracy']:.4f}, unrequested objects in {rates['unrequested']:.3f} "
                       f"of {len(eval_cond)} held-out conditions, contrast {sharp['contrast_ratio']:.3f} and "
                       f"sharpness {sharp['sharpness_ratio']:.3f} of real renders'"
                       + (f", more objects than asked in {sharp['counted_surplus']:.3f}" if image_counter else "")
                       + " (EMA; log only)")
        run.sample_grid("heldout", at, images)

    progress = Progress(run, cfg["steps"], step, show=("d_loss", "g_adv", "f_loss"))
    if step == 0:
        log_heldout(0)  # where the fine-tune starts, on the same conditions and noise
    def draw():
        """A batch of real latents, their label sets (the fakes are asked for the same sets) and noise."""
        idx = torch.randint(0, len(lat), (batch,), generator=gen)
        return lat.sample(idx, gen), lat.labels[idx], torch.randn(batch, z_dim, generator=gen)

    def backbone_features(x, cond):
        t = torch.randint(0, t_max, (batch,), generator=gen)  # each latent at its own noise level
        return disc.backbone.features(noised(x, t, tables, gen), t, cond, disc.layers)

    def d_update(real, cond, f_fake):
        with torch.no_grad():  # the frozen network's features need no graph; the heads do
            f_real = backbone_features(real, cond)
        d_real = hinge(disc.score(f_real, cond), 1.0)
        d_fake = hinge(disc.score([f.detach() for f in f_fake], cond), -1.0)
        loss, d_mis = d_real + d_fake, None
        if cfg["mismatch"] > 0:  # real latents under a label set one object off count as fake (matching-aware D)
            wrong = mismatched(cond, gen)
            with torch.no_grad():
                f_wrong = backbone_features(real, wrong)
            d_mis = hinge(disc.score(f_wrong, wrong), -1.0)
            # the fake side is a weighted mean, so that it weighs what the real side does: with a sum, a head that
            # calls everything fake (-1) would beat any other constant and learn nothing
            w = cfg["mismatch"]
            loss = d_real + (d_fake + w * d_mis) / (1 + w)
        optimiser_step(loss, d_opt)
        return d_real, d_fake, d_mis

    def f_update(fake, cond):
        """One step of the fake score: the LDM's own training loss on the generator's latents (detached)."""
        t = torch.randint(0, schedule.T, (len(fake),), generator=gen)
        loss = diffusion_loss(fake_score, fake, cond, t, torch.randn(fake.shape, generator=gen), tables, w_tab,
                              schedule.prediction)[0]
        optimiser_step(loss, f_opt, clip=fake_score.parameters())
        return loss

    def critics(real, cond, fake, f_fake):
        """Every critic's update on this batch: the heads (real against fake) and the fake score (fake only)."""
        out = {}
        if use_adv:
            d_real, d_fake, d_mis = d_update(real, cond, f_fake)
            out.update(d_loss=(d_real + d_fake).item(), d_real=d_real.item(), d_fake=d_fake.item())
            if d_mis is not None:
                out["d_mismatch"] = d_mis.item()
        if use_dmd:
            out["f_loss"] = f_update(fake.detach(), cond).item()
        return out

    with Interruption() as interrupt:
        while step < cfg["steps"]:
            real, cond, z = draw()
            extra, gnorm, f_fake = {}, 0.0, None
            if step >= cfg["d_warmup"]:
                fake = student(z, cond)
                loss = torch.zeros(())
                if use_adv:  # fool the heads at a random noise level (the gradient flows through the frozen network)
                    f_fake = backbone_features(fake, cond)
                    disc.requires_grad_(False)
                    g_adv = generator_adv(disc.score(f_fake, cond))
                    disc.requires_grad_(True)
                    loss = loss + cfg["adv_weight"] * g_adv
                    extra["g_adv"] = g_adv.item()
                if use_dmd:  # towards the guided LDM's distribution, away from the generator's own
                    g_dmd = dmd_loss(fake, cond, teacher, fake_score, cfg["dmd_guidance"], (lo, hi), tables,
                                     schedule.prediction, gen, cfg["dmd_apg_norm"], dmd_grad,
                                     cfg["dmd_class_scale"], cfg["dmd_class_iters"])
                    loss = loss + cfg["dmd_weight"] * g_dmd
                    extra["g_dmd"] = g_dmd.item()
                if cls_nets:
                    cls_term = class_term(cls_nets, fake, cond[:, :NUM_CLASSES])
                    loss = loss + args.cls_weight * cls_term
                    extra["cls"] = cls_term.item()
                if counter is not None:  # "k objects in all": a requested object drawn twice, or a faint ghost, fails it
                    total = count_reward(counter, fake, cond[:, :NUM_CLASSES], present=0.0, absent=0.0, total=1.0)
                    loss = loss + args.count_weight * total
                    extra["count"] = total.item()
                gnorm = optimiser_step(loss, opt, clip=student.parameters())
            else:  # the critics' warm-up: a generator step against untrained heads would follow noise
                with torch.no_grad():
                    fake = student(z, cond)
                    f_fake = backbone_features(fake, cond) if use_adv else None
            # critics: this step's fakes as the generator's step saw them (the heads reuse their features, which d_update
            # detaches), then --d-steps - 1 more updates on fresh batches
            figures = critics(real, cond, fake, f_fake)
            for _ in range(cfg["d_steps"] - 1):
                real, cond, z = draw()
                with torch.no_grad():
                    fake = student(z, cond)
                    f_fake = backbone_features(fake, cond) if use_adv else None
                figures = critics(real, cond, fake, f_fake)
            extra.update(figures)
            step += 1
            ema_update(ema, student, step, args.ema)
            progress.step(step, batch, lambda: dict(grad_norm=gnorm, **extra))
            evaluating = step % cfg["eval_every"] == 0 or step == cfg["steps"]
            if evaluating:
                log_heldout(step)
            stop = interrupt.requested and step < cfg["steps"]
            if evaluating or step % cfg["save_every"] == 0 or stop:
                run.checkpoint(step, modules, objects)
            if stop:
                run.log(f"stopped at step {step} of {cfg['steps']} ({interrupt.name} received); continue with --resume")
                break
    progress.close()
    final = run.path / "final"
    save_generator(copy.deepcopy(ema).float(), final, {"vae_sha": cfg["vae_sha"], "trained_steps": step,
                                                       "objective": cfg["objective"],
                                                       "discriminator": cfg["discriminator"], "dmd": cfg["dmd"],
                                                       "count_term": cfg["count_term"],
                                                       **({"init_from": cfg["init_from"]} if cfg.get("init_from")
                                                          else {}),
                                                       "train_seconds": round(run.elapsed(), 1),
                                                       **({"stopped_early": True} if interrupt.requested else {})})
    run.log(f"saved the EMA generator to {final}")
    return final, interrupt.exit_code


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, "adversarial", PRESETS)
    parser.add_argument("--init", type=Path, default=SHIPPED_GAN,
                        help="one-step student to fine-tune (default: weights/gan); 'none': the LDM called once")
    parser.add_argument("--ldm", type=Path, help="the frozen LDM whose features the discriminator reads "
                                                 "(default: weights/ldm)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float, help="generator learning rate (Adam, betas 0 / 0.99)")
    parser.add_argument("--d-lr", type=float, help="discriminator heads' learning rate")
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--d-features", choices=("ldm", "classifier"), default="ldm",
                        help="the frozen network the heads read: the LDM's blocks (LADD) or a latent classifier's "
                             "conv stages (--d-classifier; use a small --d-t-max: it was trained on near-clean "
                             "latents)")
    parser.add_argument("--d-classifier", type=Path,
                        help="latent classifier folder for --d-features classifier (trained on real latents only; "
                             "not weights/classifier, the best-of selector)")
    parser.add_argument("--d-layers", type=int, nargs="+", help="blocks (or classifier stages) whose features the "
                                                               "heads read")
    parser.add_argument("--head-width", type=int)
    parser.add_argument("--d-warmup", type=int, help="first steps that train the heads alone (the generator waits)")
    parser.add_argument("--init-disc", type=Path,
                        help="warm-start the discriminator's heads from another run of the same discriminator "
                             "(its folder, the latest checkpoint, or one ckpt-N folder in it)")
    parser.add_argument("--d-steps", type=int, help="discriminator updates per generator step (TTUR, as in DMD2)")
    parser.add_argument("--d-t-max", type=int, default=750,
                        help="the discriminator sees latents noised to t ~ U{0..this-1} (of the LDM's T)")
    parser.add_argument("--mismatch", type=float,
                        help="weight of the matching-aware term: real latents under a label set one object off "
                             "(dropped, added, or swapped for one of the same colour or shape) count as fake for the "
                             "discriminator (0: off)")
    parser.add_argument("--adv-weight", type=float, default=1.0,
                        help="weight of the adversarial term (0: no discriminator; then --dmd-weight must be > 0)")
    parser.add_argument("--dmd-weight", type=float, default=0.0,
                        help="weight of distribution matching (DMD2): the generator's latents moved along the "
                             "difference of the guided LDM's and an online fake score's predictions (0: off)")
    parser.add_argument("--dmd-guidance", type=float, default=DEFAULT_GUIDANCE,
                        help="guidance scale of the LDM's score in the DMD term (default: the LDM's sampling default)")
    parser.add_argument("--dmd-apg-norm", type=float, default=DEFAULT_APG_NORM,
                        help="0: the DMD term's LDM guided classifier-free (the runs before 2026-12-05); > 0: by "
                             "adaptive projected guidance with that norm cap (inf: no cap), which adds fewer duplicated "
                             "objects at the same accuracy (weights/ldm/MODEL_CARD.md); default: the LDM's sampling "
                             "default")
    parser.add_argument("--dmd-class-scale", type=float, default=0.0,
                        help="classifier guidance of the DMD term's LDM on its x_0 (the guide folder's label "
                             "classifier and total counter, as the deployed sampler; 0: none, the runs before the "
                             "sixteenth session)")
    parser.add_argument("--dmd-class-iters", type=int, default=DEFAULT_CLASS_ITERS,
                        help="descent steps of --dmd-class-scale per prediction")
    parser.add_argument("--dmd-guide", type=Path, default=SHIPPED_GUIDE,
                        help="the guidance classifier folder for --dmd-class-scale (default weights/guide, with its "
                             "counter/; trained on real latents only, not a judge)")
    parser.add_argument("--dmd-t-range", type=int, nargs=2, default=[20, 980], metavar=("LOW", "HIGH"),
                        help="the DMD term's noise levels: t ~ U{LOW..HIGH-1} of the LDM's T")
    parser.add_argument("--fake-lr", type=float, help="the fake score's learning rate (AdamW; DMD)")
    parser.add_argument("--min-snr", type=float, default=5.0, help="min-SNR gamma of the fake score's loss "
                                                                   "(the LDM's)")
    parser.add_argument("--cls-weight", type=float, default=0.0,
                        help="class term: x BCE of frozen latent classifier(s) on the generator's latents (0: none)")
    parser.add_argument("--cls-classifier", type=Path, nargs="+",
                        help="classifier(s) for --cls-weight (trained on real latents only; "
                             "default weights/classifier)")
    parser.add_argument("--count-weight", type=float, default=0.0,
                        help="count term: x the object counter's cross-entropy of 'as many objects as requested' on "
                             "the generator's latents (0: none); the judges cannot see a requested object drawn twice")
    parser.add_argument("--counter", type=Path,
                        help="object counter for --count-weight (python -m python.train_classifier --counts N: "
                             "trained on renders only)")
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--save-every", type=int, help="checkpoint interval in steps (also at every evaluation)")
    parser.add_argument("--eval-conditions", type=int, help="heldout.json conditions the judge scores (log only)")
    parser.add_argument("--eval-data", type=Path, help="the data folder whose heldout.json the log reads (default: "
                                                        "--data; set it to compare runs on different training sets "
                                                        "on one probe)")
    args = parser.parse_args(argv)
    if str(args.init).lower() == "none":
        args.init = None
    cfg = resolve_config(PRESETS[args.preset], args)
    final, code = train(args, cfg)
    print(json.dumps({"final": str(final), "steps": cfg["steps"]}))
    if code:  # stopped by a signal after a checkpoint: the shell sees what stopped it
        sys.exit(code)


if __name__ == "__main__":
    main()
