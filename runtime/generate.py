"""Generate images from an export folder with ONNX Runtime: no torch.

    python -m runtime.generate --labels "red sphere,yellow cube" -n 16 --model ldm --steps 20 --out grid.png
    python -m runtime.generate --conditions data/iclevr/test.json --model gan --out out/test_gan/

The LDM path runs the shared sampler maths (python/diffusion.py) with the exported denoiser; the
conditional and unconditional passes of classifier-free guidance go through one denoiser call per
step; large batches are cut into chunks of --batch; then the exported VAE decoder, then (when the
export has one) the judge. Noise comes from python/noise.py, so a seed gives the same images here
and in torch.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from python.best_of import best_of as select_best, candidate_seed
from python.diffusion import DEFAULT_GUIDANCE, Schedule, guide, make_sampler, sample_loop
from python.errors import UserError, cli
from python.labels import load_conditions, parse_label_arg
from python.memory import keep_freed_memory
from python.noise import gan_noise, initial_noise, segments, step_noise_segments
from runtime.models import ExportFolder


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

    def ldm_latents(self, cond: np.ndarray, sampler: str = "dpmpp", steps: int = 20, guidance: float = DEFAULT_GUIDANCE,
                    seed: int = 0, eta: float = 0.0, batch: int = 256, on_step=None, x_T=None,
                    seeds: list[tuple[int, int]] | None = None) -> np.ndarray:
        """Latents for multi-hot conditions. x_T (optional) replaces the seed's initial noise; seeds (optional,
        [(seed, count), ...] covering the rows in order) gives each batched request its own noise."""
        self._need("denoiser", "the LDM")
        cond = np.asarray(cond, np.float32)
        parts = seeds or [(seed, len(cond))]
        if sum(n for _, n in parts) != len(cond):
            raise UserError(f"seeds cover {sum(n for _, n in parts)} rows but there are {len(cond)} conditions")
        x_T = segments(initial_noise, parts, self.latent_shape) if x_T is None else np.asarray(x_T, np.float32)
        noise = step_noise_segments(parts, self.latent_shape)
        out = []
        for s in range(0, len(cond), batch):
            sl = slice(s, s + batch)
            c = cond[sl]
            feed_cond = np.concatenate([c, np.zeros_like(c)]) if guidance != 1.0 else c

            def denoise(x, t, c=c, feed_cond=feed_cond):
                xin = np.concatenate([x, x]) if guidance != 1.0 else x
                o = self.ex.run("denoiser", {"x": xin.astype(np.float32), "t": np.full(len(xin), t, np.int64),
                                             "cond": feed_cond})[0]
                return guide(o[:len(c)], o[len(c):], guidance) if guidance != 1.0 else o

            out.append(sample_loop(make_sampler(sampler, self.schedule, steps, eta), x_T[sl], denoise,
                                   noise=lambda i, sl=sl: noise(i)[sl],
                                   on_step=(lambda i, x, sl=sl: on_step(i, x, sl)) if on_step else None))
        return np.concatenate(out).astype(np.float32)

    def gan_latents(self, cond: np.ndarray, seed: int = 0, batch: int = 1024,
                    seeds: list[tuple[int, int]] | None = None) -> np.ndarray:
        self._need("generator", "the GAN")
        cond = np.asarray(cond, np.float32)
        parts = seeds or [(seed, len(cond))]
        if sum(n for _, n in parts) != len(cond):
            raise UserError(f"seeds cover {sum(n for _, n in parts)} rows but there are {len(cond)} conditions")
        z = segments(gan_noise, parts, self.ex.manifest["models"]["generator"]["z_dim"])
        return np.concatenate([self.ex.run("generator", {"z": z[i:i + batch], "cond": cond[i:i + batch]})[0]
                               for i in range(0, len(cond), batch)])

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
        candidates per condition by the latent classifier (python/best_of.py)."""
        if model not in ("ldm", "gan"):
            raise UserError(f"--model must be 'ldm' or 'gan', got {model!r}")
        if model == "gan":
            kw = {k: v for k, v in kw.items() if k in ("seed", "seeds")}
        if best_of > 1:
            self._need("classifier", "the latent classifier for best-of-N selection")

        # All candidates in one batched call (candidate k = the rows drawn with candidate_seed(seed, k)): a small
        # request with best-of-N runs as one batch of N x its size, not N small ones.
        cond = np.asarray(cond, np.float32)
        kw = dict(kw)
        seed, parts = kw.pop("seed", 0), kw.pop("seeds", None)
        parts = parts or [(seed, len(cond))]
        seeds = [(candidate_seed(s, k), n) for k in range(best_of) for s, n in parts]
        every = np.tile(cond, (best_of, 1))
        lat = self.ldm_latents(every, seeds=seeds, **kw) if model == "ldm" else self.gan_latents(every, seeds=seeds)
        cands = lat.reshape(best_of, len(cond), *lat.shape[1:])
        lat, _ = select_best(best_of, lambda k: cands[k], self.classifier_logits, cond)
        return self.decode(lat)


def save_images(images: np.ndarray, folder: Path) -> None:
    from PIL import Image

    from python.data import image_grid, to_uint8

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(to_uint8(images)):
        Image.fromarray(im).save(folder / f"{i}.png")
    Image.fromarray(image_grid(images)).save(folder / "grid.png")


@cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", help='comma-separated objects, e.g. "red sphere,yellow cube"')
    src.add_argument("--conditions", type=Path, help="test.json-style list of label lists")
    p.add_argument("-n", type=int, default=8, help="images for --labels (default 8)")
    p.add_argument("--model", default="ldm", help="ldm or gan")
    p.add_argument("--sampler", default="dpmpp", help="dpmpp, ddim or ddpm")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=256, help="chunk size (memory budget)")
    p.add_argument("--best-of", type=int, default=1, help="keep the best of N candidates per condition by the "
                   "export's latent classifier (N times the generator's work; default 1: plain sampling)")
    p.add_argument("--export", type=Path, help="export folder (default exports/default)")
    p.add_argument("--providers", nargs="+", help="ONNX Runtime execution providers, in order")
    p.add_argument("--threads", type=int)
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="fp16 uses the export's float16 models (export/to_onnx.py --fp16); meant for GPU providers")
    p.add_argument("--out", type=Path, required=True, help="a .png grid for --labels, a folder for --conditions")
    a = p.parse_args(argv)
    keep_freed_memory()  # batched inference: see python/memory.py
    if min(a.n, a.steps, a.batch, a.best_of) < 1:
        raise UserError("-n, --steps, --batch and --best-of must be >= 1")
    pipe = Pipeline(ExportFolder(a.export, a.providers, a.threads, a.precision))
    cond = load_conditions(a.conditions) if a.conditions else np.repeat(parse_label_arg(a.labels)[None], a.n, axis=0)
    kw = {"seed": a.seed} if a.model == "gan" else dict(sampler=a.sampler, steps=a.steps, guidance=a.guidance,
                                                        eta=a.eta, seed=a.seed, batch=a.batch)
    try:
        images = pipe.generate(cond, a.model, a.best_of, **kw)
    except ValueError as e:  # sampler name / steps out of range, from the shared maths
        raise UserError(str(e)) from None
    from PIL import Image

    from python.data import image_grid

    if a.conditions:
        save_images(images, a.out)
        res = {"images": len(images), "out": str(a.out)}
        if pipe.ex.has("judge"):
            from runtime.judge import accuracy

            res["accuracy"] = accuracy(pipe.ex, images, cond)
            if pipe.ex.has("judge2"):
                res["second_judge"] = accuracy(pipe.ex, images, cond, "judge2")
        print(json.dumps(res))
    else:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_grid(images)).save(a.out)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
