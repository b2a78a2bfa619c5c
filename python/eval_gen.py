"""Score a trained generator (LDM or GAN): accuracy over seeds with both judges, diversity, and the grids.

    python -m python.eval_gen --model ldm --data data/iclevr --seeds 0 1 2 --steps 10 25 50 --guidance 1 2 3 \\
        --out out/eval_ldm --json out/eval_ldm.json
    python -m python.eval_gen --model gan --data data/iclevr --seeds 0 1 2 --out out/eval_gan

For every setting (sampler steps x guidance for the LDM; one for the GAN) and condition file, the images of
each seed are scored by the primary judge (the headline) and the second judge (a gap over 0.03 means
something is wrong); mean and std over seeds, and accuracy by number of objects. Diversity: the mean pairwise
distance, in the second judge's feature space (the primary's where there is no second judge; the output says
which), among samples of one condition, divided by the same figure on
fresh renders of those conditions (1.0 = as varied as real scenes; near 0 = collapsed). Fidelity (unless
--no-fidelity; python/evaluation/fidelity.py): for each file of 8 or more conditions, the first seed's images
against one fresh render per condition: FD, KID, precision / recall in the second judge's features, unrequested
and missing objects, contrast and sharpness, beside their floors (a second set of renders, and the VAE's
reconstructions of it). Writes the course's grids (8 per row) for test.json and new_test.json, and for the LDM the
denoising-process image for ["red sphere", "yellow cube", "cyan cylinder"].
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from python.core.diffusion import (
    DEFAULT_APG_NORM,
    DEFAULT_CLASS_ITERS,
    DEFAULT_CLASS_SCALE,
    DEFAULT_GUIDANCE,
    check_apg_norm,
    check_class_iters,
    check_class_scale,
)
from python.core.errors import UserError, cli
from python.core.images import image_grid
from python.core.labels import encode
from python.core.memory import keep_freed_memory
from python.data.dataset import load_condition_file, to_model_range
from python.data.synthetic import render_conditions
from python.evaluation.fidelity import FEATURES, MIN_IMAGES, load_reference
from python.evaluation.generators import MODELS, TorchGenerator
from python.evaluation.metrics import object_rates, spread
from python.models.classifier import load_classifier_for
from python.models.counter import load_counter
from python.models.judge import judge_features, judge_score, load_judge
from python.models.sampling import decode
from python.models.vae import load_vae

PROCESS_LABELS = ["red sphere", "yellow cube", "cyan cylinder"]


def diversity(gen: TorchGenerator, feature_judge, cond: np.ndarray, per: int, real: tuple[float, float], **kw) -> dict:
    """Within-condition spread of generated images over that of real renders, in the judge's feature space
    (`ratio`) and in pixels (`pixel_ratio`). The two fail differently: a generator that varies only colours and
    artefacts can keep a high feature spread while its objects never move, which the pixel spread shows; extra or
    missing objects inflate the feature spread (a ratio far above 1 is not "more diverse", it is off the data)."""
    rows = np.repeat(cond, per, axis=0)  # each condition `per` times: distinct noise per row
    images = gen.images(rows, seed=0, **kw)
    fake = spread(judge_features(feature_judge, images), len(cond))
    fake_px = spread(images.flatten(1), len(cond))
    sig = lambda x: float(f"{x:.4g}")  # noqa: E731
    return {"generated": sig(fake), "real": sig(real[0]), "ratio": sig(fake / real[0]),
            "pixel_generated": sig(fake_px), "pixel_real": sig(real[1]), "pixel_ratio": sig(fake_px / real[1])}


def process_image(gen: TorchGenerator, steps: int, guidance: float, frames: int = 10,
                  apg_norm: float = DEFAULT_APG_NORM, class_scale: float = DEFAULT_CLASS_SCALE,
                  class_iters: int = DEFAULT_CLASS_ITERS) -> np.ndarray:
    """The denoising process for PROCESS_LABELS: the latent decoded at `frames` evenly spaced steps, then the end."""
    keep = set(np.linspace(0, steps - 2, frames).round().astype(int).tolist()) if steps > 1 else set()
    snaps = []
    final = gen.images(encode(PROCESS_LABELS)[None], seed=0, steps=steps, guidance=guidance, apg_norm=apg_norm,
                       class_scale=class_scale, class_iters=class_iters,
                       on_step=lambda i, x, rows: snaps.append(x.copy()) if i in keep else None)
    frames_ = decode(gen.decoder, torch.from_numpy(np.concatenate(snaps))) if snaps else final[:0]
    return image_grid(torch.cat([frames_, final]), cols=len(snaps) + 1)


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="ldm or gan")
    parser.add_argument("--weights", type=Path, default=Path(__file__).resolve().parent.parent / "weights",
                   help="folder with vae/, ldm/ or gan/, judge/ and judge2/, and guide/ for the LDM's classifier "
                        "guidance (default: the shipped weights)")
    parser.add_argument("--data", type=Path, default=Path("data/iclevr"), help="folder with the condition files")
    parser.add_argument("--files", nargs="+", default=["test.json", "new_test.json", "heldout.json"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sampler", default="dpmpp", help="dpmpp or ddim (1000 steps always use ddpm)")
    parser.add_argument("--eta", type=float, default=0.0,
                        help="--sampler ddim: the share of DDIM's stochastic noise, 0-1 (default 0, deterministic)")
    parser.add_argument("--steps", type=int, nargs="+", default=[25])
    parser.add_argument("--guidance", type=float, nargs="+", default=[DEFAULT_GUIDANCE])
    parser.add_argument("--apg-norm", type=float, nargs="+", default=[DEFAULT_APG_NORM],
                        help="0: classifier-free guidance; > 0: adaptive projected guidance with that norm cap (inf: "
                             "none); several values are several settings (python/core/diffusion.py guide_outputs)")
    parser.add_argument("--class-scale", type=float, nargs="+", default=[DEFAULT_CLASS_SCALE],
                        help="classifier guidance on x_0 with the weights folder's guide/ classifier (0: none); "
                             "several values are several settings (python/core/diffusion.py guide_class)")
    parser.add_argument("--class-iters", type=int, nargs="+", default=[DEFAULT_CLASS_ITERS],
                        help="descent steps on x_0 per sampler step in classifier guidance; several values are "
                             "several settings")
    parser.add_argument("--limit", type=int, help="score only the first N conditions of each file")
    parser.add_argument("--diversity-conditions", type=int, default=16)
    parser.add_argument("--per-condition", type=int, default=8, help="samples per condition for the diversity figure")
    parser.add_argument("--best-of", type=int, default=1, help="keep the best of N candidates per condition by the "
                   "latent classifier (python/core/best_of.py; default 1: plain sampling)")
    parser.add_argument("--classifier", type=Path, help="latent classifier for --best-of (default: weights/classifier)")
    parser.add_argument("--out", type=Path, help="folder for the grids and the denoising-process image")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cpu", help="where the generator network runs (e.g. cuda)")
    parser.add_argument("--no-fidelity", action="store_true", help="skip the fidelity figures (python/evaluation/"
                        "fidelity.py: FD, KID, precision/recall, object figures, with their floors)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # batched inference: see python/core/memory.py
    if args.model not in MODELS:
        raise UserError(f"--model must be 'ldm' or 'gan', got {args.model!r}")
    if args.per_condition < 2 or args.diversity_conditions < 1:
        raise UserError("--per-condition must be >= 2 and --diversity-conditions >= 1")
    if args.best_of < 1:
        raise UserError(f"--best-of must be >= 1, got {args.best_of}")
    apg_norms = [check_apg_norm(r, "--apg-norm") for r in args.apg_norm]
    class_scales = [check_class_scale(c, "--class-scale") for c in args.class_scale]
    class_iters_ = [check_class_iters(k, "--class-iters") for k in args.class_iters]
    gen = TorchGenerator(args.model, args.weights, args.sampler, args.device, args.eta)
    if args.out:  # before any work: the grids (test files only) and the denoising-process image are written there
        args.out.mkdir(parents=True, exist_ok=True)
    classifier = None
    if args.best_of > 1:
        classifier = load_classifier_for(args.classifier or args.weights / "classifier", args.weights / "vae")
    judge = load_judge(args.weights / "judge" / "judge.safetensors")
    second = args.weights / "judge2" / "judge.safetensors"
    judge2 = load_judge(second) if second.exists() else None
    feature_judge = judge2 if judge2 is not None else judge
    if judge2 is None:
        print(f"no second judge at {second}: second-judge accuracy left out; diversity measured in the primary "
              f"judge's feature space instead (labelled so in the output)")
    counter = None
    if (args.weights / "counter" / "config.json").exists():
        counter = load_counter(args.weights / "counter")[0]
    elif not args.no_fidelity:
        print(f"no object counter at {args.weights / 'counter'}: the counted-object figures are left out")
    files = {f: load_condition_file(args.data, f)[: args.limit] for f in args.files}
    settings = ([(s, g, r, c, k) for s in args.steps for g in args.guidance for r in apg_norms for c in class_scales
                 for k in (class_iters_ if c else [1])]  # the iterations matter only with classifier guidance
                if args.model == "ldm" else [(None, None, None, None, None)])

    div_cond = files[args.files[0]][: args.diversity_conditions]
    real_images = to_model_range(render_conditions(div_cond, args.per_condition))
    real_spread = (spread(judge_features(feature_judge, real_images), len(div_cond)),
                   spread(real_images.flatten(1), len(div_cond)))
    report = {"model": args.model, "weights": str(args.weights), "sampler": args.sampler if args.model == "ldm" else None,
              **({"eta": args.eta} if args.eta else {}),
              "seeds": args.seeds, "limit": args.limit, "best_of": args.best_of, "results": []}
    references = {}
    if not args.no_fidelity:
        vae = load_vae(args.weights / "vae")
        references = {name: load_reference(args.data, name, cond, feature_judge, judge, vae, counter)
                      for name, cond in files.items() if len(cond) >= MIN_IMAGES}
        report["fidelity"] = {
            "features": FEATURES if judge2 is not None else "primary judge's penultimate layer (512-d)",
            "images": f"seed {args.seeds[0]}'s, one per condition, against one fresh render per condition",
            "floors": {name: ref.floors for name, ref in references.items()}}
    for steps, guidance, apg_norm, class_scale, class_iters in settings:
        kw = (dict(steps=steps, guidance=guidance, apg_norm=apg_norm, class_scale=class_scale, class_iters=class_iters)
              if args.model == "ldm" else {})
        kw.update(best_of=args.best_of, classifier=classifier)
        t0 = time.time()
        row = {"steps": steps, "guidance": guidance, "apg_norm": apg_norm, "class_scale": class_scale, "files": {},
               **({"sampler": gen.sampler_for(steps)} if args.model == "ldm" else {})}  # ddpm at T, whatever --sampler
        if args.model == "ldm" and class_scale:  # the guidance loss's count term, where weights/guide/counter has one
            row["count_weight"] = gen.class_grad().count_weight
            row["class_iters"] = class_iters
        for name, cond in files.items():
            per_seed, per_seed2, by_obj, extra = [], [], {}, []
            for seed in args.seeds:
                images = gen.images(cond, seed, **kw)
                res = judge_score(judge, images, cond)
                per_seed.append(res["accuracy"])
                extra.append(object_rates(judge, images, cond)["unrequested"])
                for k, v in res["by_objects"].items():
                    by_obj.setdefault(k, []).append(v)
                if judge2 is not None:
                    per_seed2.append(judge_score(judge2, images, cond)["accuracy"])
                if seed == args.seeds[0] and name in references:
                    fidelity = references[name].figures(images)
                if args.out and seed == args.seeds[0] and name in ("test.json", "new_test.json"):
                    tag = (f"{args.model}" + (f"_best_of_{args.best_of}" if args.best_of > 1 else "") + f"_{Path(name).stem}"
                           + (f"_{gen.sampler_for(steps)}" if steps and gen.sampler_for(steps) != "dpmpp"
                              else "")
                           + (f"_eta{args.eta:g}" if args.eta else "")
                           + (f"_s{steps}_g{guidance:g}" if steps else "") + (f"_apg{apg_norm:g}" if apg_norm else "")
                           + (f"_cg{class_scale:g}" if class_scale else "")
                           + (f"_it{class_iters}" if class_scale and class_iters != 1 else ""))  # never overwritten
                    Image.fromarray(image_grid(images)).save(args.out / f"{tag}.png")
            row["files"][name] = {
                "n": len(cond), "accuracy_mean": round(float(np.mean(per_seed)), 4),
                "accuracy_std": round(float(np.std(per_seed)), 4), "per_seed": [round(x, 4) for x in per_seed],
                "second_judge_mean": round(float(np.mean(per_seed2)), 4) if per_seed2 else None,
                "by_objects": {k: round(float(np.mean(v)), 4) for k, v in sorted(by_obj.items())},
                "unrequested_object_rate": round(float(np.mean(extra)), 4),
                **({"fidelity": fidelity} if name in references else {})}
        row["diversity"] = diversity(gen, feature_judge, div_cond, args.per_condition, real_spread, **kw)
        row["diversity"]["features"] = "second judge" if judge2 is not None else "primary judge"
        row["seconds"] = round(time.time() - t0, 1)
        report["results"].append(row)
        print(f"{args.model} steps={steps} guidance={guidance}" + (f" apg_norm={apg_norm:g}" if apg_norm else "")
              + (f" class_scale={class_scale:g} class_iters={class_iters}" if class_scale else "")
              + ": " + "; ".join(
            f"{n} {r['accuracy_mean']:.4f}+-{r['accuracy_std']:.4f} (2nd {r['second_judge_mean']})"
            + (f" KID x1000 {r['fidelity']['kid_x1000']:.1f} FD {r['fidelity']['fd']:.1f}" if "fidelity" in r else "")
            for n, r in row["files"].items()) + f"; diversity {row.get('diversity')}", flush=True)
    if args.out and args.model == "ldm":
        steps, guidance, apg_norm, class_scale, class_iters = settings[0]
        Image.fromarray(process_image(gen, min(steps, 50), guidance, apg_norm=apg_norm, class_scale=class_scale,
                                      class_iters=class_iters)).save(args.out / "ldm_denoising_process.png")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
