"""`make demo`: the whole chain on the embedded default, with whatever trained weights the repo ships.

Renders a small synthetic evaluation set if none is there (the full training set is not needed once
weights are shipped), then for each stage that has shipped weights runs it and prints its figures,
and for each stage that does not, says so plainly. Outputs go to out/demo/.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image

from bench.latency import main as bench
from export.to_onnx import export_all
from python.core.diffusion import DEFAULT_APG_NORM, DEFAULT_GUIDANCE
from python.core.errors import cli
from python.core.images import image_grid, rows_grid
from python.data.dataset import load_condition_file, load_split, to_model_range
from python.data.synthetic import make_dataset
from python.evaluation.generators import TorchGenerator
from python.models.judge import SHIPPED_JUDGES, judge_score, load_judge
from python.models.vae import SHIPPED_VAE, load_vae, psnr, reconstruct
from python.models.weights import SHIPPED
from runtime.judge import accuracy
from runtime.models import ExportFolder

REPO = SHIPPED.parent


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.time()


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "demo")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}

    t = _step("data")
    if not (args.data / "heldout_renders.json").exists():
        stats = make_dataset(args.data, scenes=64, seed=0, heldout_images=500, heldout_conditions=1024)
        print(f"rendered {stats['train']['images']} training images and 500 held-out renders into {args.data} "
              f"({stats['train_images_per_sec']} img/s)")
    else:
        print(f"using {args.data}")
    print(f"contact sheet: {args.data / 'contact_sheet.png'}  ({time.time() - t:.0f}s)")

    held = load_split(args.data, "heldout_renders.json", images=args.data / "heldout_renders", progress=False)
    t = _step("judge (primary, resnet18, official layout)")
    if SHIPPED_JUDGES["primary"].exists():
        res = judge_score(load_judge(), to_model_range(held.images), held.labels)
        summary["judge_heldout_accuracy"] = res["accuracy"]
        print(f"held-out renders: accuracy {res['accuracy']:.4f}; by number of objects "
              + ", ".join(f"{k}: {v:.4f}" for k, v in res["by_objects"].items()) + f"  ({time.time() - t:.0f}s)")
        if SHIPPED_JUDGES["second"].exists():
            res2 = judge_score(load_judge(which="second"), to_model_range(held.images), held.labels)
            summary["judge2_heldout_accuracy"] = res2["accuracy"]
            print(f"second judge: accuracy {res2['accuracy']:.4f}")
        else:
            print("second judge: not shipped yet")
    else:
        print(f"not shipped yet ({SHIPPED_JUDGES['primary']} missing): train with `python -m python.train_evaluator`")

    t = _step("VAE")
    if (SHIPPED_VAE / "config.json").exists():
        vae = load_vae()
        rec = reconstruct(vae, held.images)
        summary["vae_psnr"] = float(psnr(to_model_range(held.images), rec).mean())
        Image.fromarray(rows_grid(to_model_range(held.images[:16]), rec[:16])).save(args.out / "vae_reconstructions.png")
        line = f"held-out PSNR {summary['vae_psnr']:.2f} dB"
        if SHIPPED_JUDGES["primary"].exists():
            summary["vae_judge_recon"] = judge_score(load_judge(), rec, held.labels)["accuracy"]
            line += f", judge on reconstructions {summary['vae_judge_recon']:.4f}"
        print(f"{line}; grid {args.out / 'vae_reconstructions.png'}  ({time.time() - t:.0f}s)")
    else:
        print("not shipped yet: train with `python -m python.train_vae` (issue: the VAE)")

    for name in ("ldm", "gan"):
        t = _step(name.upper())
        if not (SHIPPED / name / "config.json").exists() or not SHIPPED_JUDGES["primary"].exists():
            print(f"not shipped yet: the conditional latent {name.upper()} is still to be trained; nothing to generate")
            continue
        gen = TorchGenerator(name, SHIPPED)
        cond = load_condition_file(args.data, "test.json")
        images = gen.images(cond, seed=0, steps=25, guidance=DEFAULT_GUIDANCE) if name == "ldm" else gen.images(cond, seed=0)
        summary[f"{name}_test_accuracy"] = judge_score(load_judge(), images, cond)["accuracy"]
        Image.fromarray(image_grid(images)).save(args.out / f"{name}_test.png")
        how = (f"DPM-Solver++ 25 steps, guidance {DEFAULT_GUIDANCE:g} (APG, norm cap {DEFAULT_APG_NORM:g})"
               if name == "ldm" else "one forward pass")
        print(f"test.json ({len(cond)} conditions, {how}): "
              f"accuracy {summary[f'{name}_test_accuracy']:.4f}; grid {args.out / f'{name}_test.png'}  "
              f"({time.time() - t:.0f}s)")

    t = _step("export + torch-free runtime")
    manifest = export_all(None, args.out / "export", formats=("onnx", "torchscript"))
    if "judge" in manifest["models"]:
        acc = accuracy(ExportFolder(args.out / "export"), to_model_range(held.images).numpy(), held.labels)
        summary["onnx_judge_heldout_accuracy"] = acc
        print(f"ONNX judge (onnxruntime, no torch) on held-out renders: {acc:.4f}  ({time.time() - t:.0f}s)")
    t = _step("benchmark (bench/latency.py --quick)")
    res = bench(["--quick", "--export", str(args.out / "export"), "--data", str(args.data), "--json",
                 str(args.out / "bench.json"), "--plot", str(args.out / "bench.png")])
    summary["bench_results"] = len(res["results"])
    print(f"({time.time() - t:.0f}s)")
    print("\nsummary:", json.dumps(summary))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
