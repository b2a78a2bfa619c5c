"""Generate images from an export folder with ONNX Runtime: no torch.

    python -m runtime.generate --labels "red sphere,yellow cube" -n 16 --model ldm --steps 20 --out grid.png
    python -m runtime.generate --conditions data/iclevr/test.json --model gan --out out/test_gan/

Both paths run the core sampling loop (python/core/sampling.py) with ONNX Runtime sessions as its model calls:
the LDM's DPM-Solver++ / DDIM / DDPM with guidance (adaptive projected by default, classifier-free with
--apg-norm 0; the conditional and unconditional passes in one denoiser call per step, chunks of --batch; then
classifier guidance on x_0 through the export's class_grad graph, off with --class-scale 0), or the
GAN path's one generator call; then the exported VAE decoder,
then (when the export has one) the judge. Noise comes from python/core/noise.py, so a seed gives the same images
here and in torch.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from python.core.best_of import best_of_latents
from python.core.diffusion import (
    DEFAULT_APG_NORM,
    DEFAULT_CLASS_ITERS,
    DEFAULT_CLASS_SCALE,
    DEFAULT_GUIDANCE,
    SAMPLERS,
    Schedule,
    check_apg_norm,
    check_class_iters,
    check_class_scale,
    check_eta,
)
from python.core.errors import UserError, cli
from python.core.images import image_grid, to_uint8
from python.core.labels import load_conditions, parse_label_arg
from python.core.memory import keep_freed_memory
from python.core.noise import initial_noise
from python.core.sampling import diffusion_latents, one_step_latents
from runtime.judge import accuracy
from runtime.models import BACKENDS, PRECISIONS, ExportFolder

# The command line's bounds (the server has its own, smaller ones: runtime.serve.Limits). One decoded image is 48 KiB
# of float32 and the pipeline holds every image of a call at once, so 65,536 images need ~3.2 GiB beside the models.
MAX_IMAGES = 65_536
MAX_GUIDANCE = 20.0
MAX_BEST_OF = 16


def check_settings(n: int, steps: int, guidance: float, eta: float, seed: int, batch: int, best_of: int,
                   sampler: str, schedule_steps: int, apg_norm: float = DEFAULT_APG_NORM,
                   class_scale: float = DEFAULT_CLASS_SCALE, class_iters: int = DEFAULT_CLASS_ITERS) -> None:
    """UserError naming the first setting outside its range (NaN and infinity included) and what is valid."""
    checks = [("-n", n, 1, MAX_IMAGES), ("--steps", steps, 1, schedule_steps), ("--batch", batch, 1, MAX_IMAGES),
              ("--best-of", best_of, 1, MAX_BEST_OF), ("--seed", seed, 0, 2 ** 63 - 1),
              ("--guidance", guidance, 0.0, MAX_GUIDANCE)]
    for flag, value, lo, hi in checks:
        if not (math.isfinite(value) and lo <= value <= hi):
            raise UserError(f"{flag} must be between {lo} and {hi}, got {value}")
    check_eta(eta, "--eta")
    check_apg_norm(apg_norm, "--apg-norm")
    check_class_scale(class_scale, "--class-scale")
    if not class_scale <= MAX_GUIDANCE:
        raise UserError(f"--class-scale must be between 0 and {MAX_GUIDANCE}, got {class_scale}")
    check_class_iters(class_iters, "--class-iters")
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if n * best_of > MAX_IMAGES:
        raise UserError(f"-n x --best-of = {n * best_of} candidate images, at most {MAX_IMAGES} in one call")


def check_output(out: Path, folder: bool) -> None:
    """UserError before any work when --out cannot be written as asked (a folder, or a .png file)."""
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a folder")
    if folder and out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file exists there; --conditions writes a folder of images")
    if not folder and (out.is_dir() or out.suffix.lower() != ".png"):
        raise UserError(f"--out {out}: --labels writes one grid image; give a file name ending in .png")


class Pipeline:
    """The generators of one export folder."""

    def __init__(self, export: ExportFolder):
        self.ex = export
        m = export.manifest["models"]
        self.latent_shape = tuple(m["decoder"]["latent_shape"]) if "decoder" in m else None
        self.schedule = Schedule(**m["denoiser"]["schedule"]) if "denoiser" in m else None

    def _need(self, name: str, what: str):
        if not self.ex.has(name):
            raise UserError(f"{self.ex.path}: the export has no {name} ({what} not trained or not exported yet)")

    @property
    def default_class_scale(self) -> float:
        """The classifier-guidance scale a caller that names none gets where it follows the export (the server):
        DEFAULT_CLASS_SCALE where the export has class_grad, else 0."""
        return DEFAULT_CLASS_SCALE if self.ex.has("class_grad") else 0.0

    def ldm_latents(self, cond: np.ndarray, sampler: str = "dpmpp", steps: int = 20, guidance: float = DEFAULT_GUIDANCE,
                    seed: int = 0, eta: float = 0.0, batch: int = 256, on_step=None, x_T=None,
                    seeds: list[tuple[int, int]] | None = None, apg_norm: float = DEFAULT_APG_NORM,
                    class_scale: float = DEFAULT_CLASS_SCALE, class_iters: int = DEFAULT_CLASS_ITERS) -> np.ndarray:
        """Latents for multi-hot conditions. x_T (optional) replaces the seed's initial noise; seeds (optional,
        [(seed, count), ...] covering the rows in order) gives each batched request its own noise; apg_norm > 0:
        adaptive projected guidance; class_scale > 0: classifier guidance with the export's class_grad, class_iters
        descent steps per sampler step (python/core/sampling.py)."""
        self._need("denoiser", "the LDM")
        if class_scale:
            self._need("class_grad", "the guidance classifier, weights/guide, for --class-scale > 0; "
                       "give --class-scale 0 to sample without it")
        denoiser = lambda x, t, cond: self.ex.run("denoiser", {"x": x, "t": t, "cond": cond})[0]  # noqa: E731
        grad = lambda z, c: self.ex.run("class_grad", {"latents": z.astype(np.float32), "cond": c})[0]  # noqa: E731
        return diffusion_latents(denoiser, self.schedule, cond, self.latent_shape, sampler, steps, guidance, eta,
                                 seed, seeds, batch, x_T, on_step, apg_norm, grad if class_scale else None,
                                 class_scale, class_iters, self.ex.layout_bank)

    def gan_latents(self, cond: np.ndarray, seed: int = 0, batch: int = 1024,
                    seeds: list[tuple[int, int]] | None = None) -> np.ndarray:
        self._need("generator", "the GAN")
        generator = lambda z, cond: self.ex.run("generator", {"z": z, "cond": cond})[0]  # noqa: E731
        return one_step_latents(generator, cond, self.ex.manifest["models"]["generator"]["z_dim"], seed, seeds, batch,
                                self.ex.generator_layout_bank)

    def decode(self, latents: np.ndarray, batch: int = 256) -> np.ndarray:
        self._need("decoder", "the VAE")
        return np.concatenate([self.ex.run("decoder", {"latents": latents[i:i + batch].astype(np.float32)})[0]
                               for i in range(0, len(latents), batch)])

    def classifier_logits(self, latents: np.ndarray, batch: int = 1024) -> np.ndarray:
        self._need("classifier", "the latent classifier for best-of-N selection")
        return np.concatenate([self.ex.run("classifier", {"latents": latents[i:i + batch].astype(np.float32)})[0]
                               for i in range(0, len(latents), batch)])

    def generate(self, cond, model: str = "ldm", best_of: int = 1, **kw) -> np.ndarray:
        """Images (N, 3, 64, 64) in [-1, 1] for multi-hot conditions; best_of > 1 keeps the best of that many
        candidates per condition by the latent classifier (python/core/best_of.py)."""
        if model not in ("ldm", "gan"):
            raise UserError(f"--model must be 'ldm' or 'gan', got {model!r}")
        if best_of > 1:
            self._need("classifier", "the latent classifier for best-of-N selection")
        seed, seeds = kw.pop("seed", 0), kw.pop("seeds", None)
        if model == "ldm":
            sample = lambda c, s: self.ldm_latents(c, seeds=s, **kw)  # noqa: E731
        else:
            sample = lambda c, s: self.gan_latents(c, seeds=s)  # noqa: E731
        return self.decode(best_of_latents(sample, cond, best_of, self.classifier_logits, seed, seeds))


def save_images(images: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(to_uint8(images)):
        Image.fromarray(im).save(folder / f"{i}.png")
    Image.fromarray(image_grid(images)).save(folder / "grid.png")


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", help='comma-separated objects, e.g. "red sphere,yellow cube"')
    src.add_argument("--conditions", type=Path, help="test.json-style list of label lists")
    parser.add_argument("-n", type=int, default=8, help="images for --labels (default 8)")
    parser.add_argument("--model", default="ldm", help="ldm or gan")
    parser.add_argument("--sampler", default="dpmpp", help="dpmpp, ddim or ddpm")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--apg-norm", type=float, default=DEFAULT_APG_NORM,
                        help="adaptive projected guidance (Sadat et al. 2024) with that cap on the update's norm "
                             "(inf: no cap); 0: classifier-free guidance")
    parser.add_argument("--class-scale", type=float, default=DEFAULT_CLASS_SCALE,
                        help="classifier guidance on x_0 with the export's guidance classifier (class_grad); 0: none")
    parser.add_argument("--class-iters", type=int, default=DEFAULT_CLASS_ITERS,
                        help="descent steps on x_0 per sampler step in classifier guidance, each one more class_grad "
                             "call (1 is the cheapest)")
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=256, help="chunk size (memory budget)")
    parser.add_argument("--best-of", type=int, default=1, help="keep the best of N candidates per condition by the "
                   "export's latent classifier (N times the generator's work; default 1: plain sampling)")
    parser.add_argument("--export", type=Path, help="export folder (default exports/default)")
    parser.add_argument("--providers", nargs="+", help="ONNX Runtime execution providers, in order")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp16 / int8: the export's float16 copies (export/to_onnx.py --fp16; for GPU providers) "
                             "or int8 copies (--int8; for CPUs with VNNI), where it has them; fp32 elsewhere")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                        help="the engine that runs the export's graphs: onnxruntime (CPU or GPU providers) or openvino "
                             "(CPU; int8 from its NNCF copies, export/to_onnx.py --int8 with openvino and nncf installed)")
    parser.add_argument("--out", type=Path, required=True, help="a .png grid for --labels, a folder for --conditions")
    parser.add_argument("--save-cond", type=Path, metavar="DIR",
                        help="also write the LDM's inputs for these conditions and --seed to DIR: cond.f32 (its "
                             "condition rows; a layout denoiser's with the places drawn, python/core/layout.py) and "
                             "noise.f32 (x_T), the --cond and --noise files of the C++ sampler (runtime/cpp)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # batched inference: see python/core/memory.py
    if args.model not in ("ldm", "gan"):
        raise UserError(f"--model must be 'ldm' or 'gan', got {args.model!r}")
    pipe = Pipeline(ExportFolder(args.export, args.providers, args.threads, args.precision, args.backend))
    cond = load_conditions(args.conditions) if args.conditions else parse_label_arg(args.labels)[None]
    check_settings(len(cond) if args.conditions else args.n, args.steps, args.guidance, args.eta, args.seed,
                   args.batch, args.best_of, args.sampler, pipe.schedule.T if pipe.schedule else 1000, args.apg_norm,
                   args.class_scale, args.class_iters)
    check_output(args.out, folder=bool(args.conditions))
    if args.labels:
        cond = np.repeat(cond, args.n, axis=0)
    if args.save_cond:
        if args.model != "ldm" or not pipe.ex.has("denoiser"):
            raise UserError("--save-cond writes the LDM's inputs: give --model ldm with an export that has the "
                            "denoiser")
        args.save_cond.mkdir(parents=True, exist_ok=True)
        bank = pipe.ex.layout_bank
        (bank.condition_rows(cond, args.seed) if bank is not None else cond).astype(np.float32).tofile(
            args.save_cond / "cond.f32")
        initial_noise(args.seed, len(cond), pipe.latent_shape).tofile(args.save_cond / "noise.f32")
    kw = {"seed": args.seed} if args.model == "gan" else dict(sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                                                        eta=args.eta, seed=args.seed, batch=args.batch,
                                                        apg_norm=args.apg_norm, class_scale=args.class_scale,
                                                        class_iters=args.class_iters)
    try:
        images = pipe.generate(cond, args.model, args.best_of, **kw)
    except ValueError as e:  # sampler name / steps out of range, from the shared maths
        raise UserError(str(e)) from None
    if args.conditions:
        save_images(images, args.out)
        res = {"images": len(images), "out": str(args.out)}
        if pipe.ex.has("judge"):
            res["accuracy"] = accuracy(pipe.ex, images, cond)
            if pipe.ex.has("judge2"):
                res["second_judge"] = accuracy(pipe.ex, images, cond, "judge2")
        print(json.dumps(res))
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_grid(images)).save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
