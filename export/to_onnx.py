"""Export the trained networks to ONNX (and TorchScript) with a manifest the runtime reads.

    python export/to_onnx.py [--weights DIR] [--out DIR] [--format onnx|torchscript|both] [--fp16] [--triton DIR]
    python export/to_onnx.py --int8 --data data/iclevr     # also int8 copies, calibrated on the data's latents

Every export is checked (onnx.checker) and verified against torch on random inputs; `--fp16` adds a float16
copy of each ONNX model (float32 inputs and outputs kept, verified to FP16_TOL); `--int8` an int8 copy of the
decoder, denoiser, generator and classifier (export/quantize.py: static, calibrated on real latents, verified and
refused above INT8_TOL); where TensorRT imports (a GPU
machine), fp16 engines are built from the ONNX files with profiles for batch 1..256. The manifest
(manifest.json) lists each model's file, inputs, outputs, checksum and verification figure, plus
the label list, so the runtime needs nothing else. Networks whose weights do not exist yet are
skipped with a one-line notice.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as `python export/to_onnx.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn as nn

from python.core.checksum import sha256
from python.core.diffusion import Schedule
from python.core.errors import UserError, cli
from python.core.folders import replace_folder
from python.core.labels import CLASS_NAMES
from python.core.layout import BANK_FILE, GENERATOR_BANK_FILE
from python.models.classifier import load_class_grad, load_classifier
from python.models.denoiser import load_denoiser
from python.models.generators import load_generator, reads_layout
from python.models.judge import SHIPPED_JUDGES, judge_logits, load_judge
from python.models.vae import Decoder, load_vae, require_latent_space
from python.models.weights import SHIPPED

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "exports" / "default"
# 20: the first opset with a Gelu operator. At 17 the denoiser's tanh-GELU is exported as eight elementwise
# nodes that ONNX Runtime's CPU provider does not fuse; at 20 it becomes one FastGelu kernel. Measured
# (denoiser, batch 128, 1 thread): 0.80 s per call at opset 17, 0.60 s at 20 (torch eager 0.77 s).
OPSET = 20


class JudgeForExport(nn.Module):
    """The judge with two outputs: the official sigmoid probabilities and the logits.

    The runtime ranks by logits: the same order as the probabilities wherever those differ, and a
    defined order where float32 sigmoid saturates (several outputs exactly 1.0)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images):
        z = judge_logits(self.net, images)
        return torch.sigmoid(z), z


def max_rel_err(got, ref) -> float:
    """Largest abs difference between exported outputs and torch's, relative to each output's scale (>= 1)."""
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    return max(float(np.abs(np.asarray(g) - r.numpy()).max() / max(1.0, float(r.abs().max())))
               for g, r in zip(got, ref))


def export_onnx(module: nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str], path: Path,
                check_inputs: dict[str, torch.Tensor]) -> dict:
    """torch -> ONNX with a dynamic batch axis; checked and verified against torch. Returns the manifest entry."""
    import onnx
    import onnxruntime as ort

    module = module.eval()
    dyn = {n: {0: "batch"} for n in [*inputs, *outputs]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(inputs.values()), str(path), input_names=list(inputs), output_names=outputs,
                          dynamic_axes=dyn, opset_version=OPSET, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in check_inputs.items()})
    with torch.no_grad():
        ref = module(*check_inputs.values())
    err = max_rel_err(got, ref)
    if err > 1e-4:
        raise RuntimeError(f"{path.name}: ONNX output differs from torch by {err:.2e} (relative), above 1e-4")
    return {"file": path.name, "format": "onnx", "opset": OPSET,
            "inputs": {k: {"shape": ["batch", *v.shape[1:]], "dtype": str(v.dtype).removeprefix("torch.")}
                       for k, v in inputs.items()},
            "outputs": outputs, "verified_max_rel_err": err, "sha256": sha256(path), "bytes": path.stat().st_size}


FP16_TOL = 2e-2  # relative to the output scale: float16 keeps ~3 significant digits, and errors add up over layers


def _toposort(graph) -> None:
    """Reorder graph.node so that every node comes after the nodes producing its inputs (ONNX requires it)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            (ordered if all(i in ready for i in n.input) else rest).append(n)
            if ordered and ordered[-1] is n:
                ready.update(n.output)
        if len(rest) == len(pending):
            raise RuntimeError("ONNX graph has a cycle or an input nothing produces")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def export_onnx_fp16(src: Path, path: Path, check_inputs: dict[str, torch.Tensor], module: nn.Module) -> dict:
    """A float16 copy of an ONNX model (inputs and outputs stay float32), verified against torch."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    _toposort(model.graph)  # the converter appends its input casts after the nodes that read them
    onnx.save(model, str(path))
    onnx.checker.check_model(onnx.load(str(path)))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {k: v.numpy() for k, v in check_inputs.items()})
    with torch.no_grad():
        ref = module.eval()(*check_inputs.values())
    err = max_rel_err(got, ref)
    if err > FP16_TOL:
        raise RuntimeError(f"{path.name}: fp16 ONNX output differs from torch by {err:.2e} (relative), above {FP16_TOL}")
    return {"file": path.name, "format": "onnx-fp16", "opset": OPSET, "verified_max_rel_err": err,
            "tolerance": FP16_TOL, "sha256": sha256(path), "bytes": path.stat().st_size}


def build_tensorrt(out: Path, manifest: dict, max_batch: int = 256) -> None:
    """fp16 TensorRT engines from the ONNX files, one optimisation profile (batch 1 / 64 / max_batch; the
    denoiser's batch is doubled by guidance). Only where TensorRT imports; otherwise one line and nothing."""
    try:
        import tensorrt as trt
    except ImportError:
        print("tensorrt: not installed (no GPU here): engines skipped; ONNX Runtime's TensorRT and CUDA providers "
              "are used instead where they exist")
        return
    logger = trt.Logger(trt.Logger.WARNING)
    for name in [n for n, m in manifest["models"].items() if m.get("format") == "onnx"]:
        entry = manifest["models"][name]
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse((out / entry["file"]).read_bytes()):
            raise RuntimeError(f"tensorrt could not parse {entry['file']}: {parser.get_error(0)}")
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        top = 2 * max_batch if name == "denoiser" else max_batch
        for i in range(network.num_inputs):
            inp = network.get_input(i)
            tail = tuple(inp.shape)[1:]
            profile.set_shape(inp.name, (1, *tail), (min(64, top), *tail), (top, *tail))
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise RuntimeError(f"tensorrt failed to build an engine for {entry['file']}")
        path = out / f"{name}.engine"
        path.write_bytes(bytes(engine))
        manifest["models"][f"{name}_trt"] = {"file": path.name, "format": "tensorrt", "precision": "fp16",
                                             "max_batch": top, "tensorrt": trt.__version__, "sha256": sha256(path),
                                             "bytes": path.stat().st_size}
        print(f"{name}: TensorRT engine built (fp16, batch 1..{top})")


def export_torchscript(module: nn.Module, inputs: dict[str, torch.Tensor], path: Path,
                       check_inputs: dict[str, torch.Tensor]) -> dict:
    """Traced and frozen TorchScript, verified like the ONNX export."""
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.freeze(torch.jit.trace(module, tuple(inputs.values())))
        ts.save(str(path))
        got, ref = torch.jit.load(str(path))(*check_inputs.values()), module(*check_inputs.values())
    err = max_rel_err(tuple(g.numpy() for g in got) if isinstance(got, tuple) else got.numpy(), ref)
    if err > 1e-4:
        raise RuntimeError(f"{path.name}: TorchScript output differs from torch by {err:.2e} (relative)")
    return {"file": path.name, "format": "torchscript", "verified_max_rel_err": err, "sha256": sha256(path),
            "bytes": path.stat().st_size}


def _weights(weights: Path | None, name: str) -> Path:
    return (Path(weights) if weights else SHIPPED) / name


def collect(weights: Path | None, vae: Path | None = None) -> dict:
    """{name: (module, example inputs, check inputs, output names, manifest extras)} for every network whose
    weights exist; a one-line notice for each that does not. `vae`: the VAE folder whose decoder is exported (default:
    the weights folder's vae/); the generators must be in its latent space."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    conds = torch.zeros(5, 24)
    for i in range(5):
        conds[i, torch.randperm(24, generator=gen)[: 1 + i % 3]] = 1
    found = {}
    for name, which in (("judge", "primary"), ("judge2", "second")):
        path = _weights(weights, SHIPPED_JUDGES[which].parent.name) / "judge.safetensors"
        if path.exists():
            ex, chk = {"images": rand(2, 3, 64, 64)}, {"images": rand(5, 3, 64, 64).clamp(-1, 1)}
            found[name] = (JudgeForExport(load_judge(path)), ex, chk, ["probs", "logits"], {})
        else:
            print(f"{name}: no weights at {path}; skipped")
    vae_dir = Path(vae) if vae else _weights(weights, "vae")
    if vae and not (vae_dir / "config.json").exists():
        raise UserError(f"--vae {vae_dir}: not a VAE folder (no config.json)")
    if not (vae_dir / "config.json").exists():
        print(f"decoder, denoiser, generator: no VAE at {vae_dir}; skipped")
        return found
    vae = load_vae(vae_dir)
    shape = vae.cfg.latent_shape
    found["decoder"] = (Decoder(vae), {"latents": rand(2, *shape)}, {"latents": rand(5, *shape)}, ["images"],
                        {"latent_shape": list(shape)})
    for name, folder, loader in (("denoiser", "ldm", load_denoiser), ("generator", "gan", load_generator)):
        d = _weights(weights, folder)
        if not (d / "config.json").exists():
            print(f"{name}: no weights at {d}; skipped")
            continue
        model, cfg = loader(d)
        require_latent_space(d, cfg, vae_dir)
        if name == "denoiser":
            t = torch.tensor([999, 10, 500, 0, 250])
            rows = torch.from_numpy(model.layout_bank.condition_rows(conds.numpy())) if model.cfg.layout else conds
            found[name] = (model, {"x": rand(2, *shape), "t": t[:2], "cond": rows[:2]},
                           {"x": rand(5, *shape), "t": t, "cond": rows}, ["out"],
                           {"schedule": cfg["schedule"], **({"layout": BANK_FILE} if model.cfg.layout else {})})
        else:
            z, layout = model.cfg.z_dim, reads_layout(model)
            rows = torch.from_numpy(model.layout_bank.condition_rows(conds.numpy())) if layout else conds
            found[name] = (model, {"z": rand(2, z), "cond": rows[:2]}, {"z": rand(5, z), "cond": rows}, ["latents"],
                           {"z_dim": z, **({"layout": GENERATOR_BANK_FILE} if layout else {})})
    d = _weights(weights, "classifier")
    if (d / "config.json").exists():
        cls, cfg = load_classifier(d)
        require_latent_space(d, cfg, vae_dir)
        found["classifier"] = (cls, {"latents": rand(2, *shape)}, {"latents": rand(5, *shape)}, ["logits"], {})
    else:
        print(f"classifier: no weights at {d}; skipped (best-of-N selection unavailable)")
    d = _weights(weights, "guide")
    if (d / "config.json").exists():
        grad = load_class_grad(d, vae_dir)
        if grad.total is None:
            print(f"class_grad: no total counter at {d / 'counter'}; the guidance loss's count term left out")
        found["class_grad"] = (grad, {"latents": rand(2, *shape), "cond": conds[:2]},
                               {"latents": rand(5, *shape), "cond": conds}, ["grad"], {})
    else:
        print(f"class_grad: no guidance classifier at {d}; skipped (the LDM's classifier guidance unavailable)")
    return found


def export_all(weights: Path | None, out: Path, formats=("onnx",), fp16: bool = False,
               int8_data: Path | None = None, vae: Path | None = None) -> dict:
    """Export every network under `weights` (the decoder from `vae` when given: another decoder of the same latent
    space) into `out`, atomically: everything is written and verified in a temporary folder beside `out`, the
    manifest (each file's sha256) last, and only then does the folder replace `out`. An export that fails or is
    killed leaves `out` as it was."""
    out = Path(out)
    if weights and not Path(weights).is_dir():
        raise UserError(f"{weights}: weights folder not found")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists())):
        raise UserError(f"{out}: exists and is not an export folder (no manifest.json); an export replaces its "
                        f"--out folder whole, so give a new or empty folder, or an earlier export")
    stage = out.parent / f".{out.name}.export-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
    except OSError as e:
        raise UserError(f"{out}: output folder is not writable ({e.strerror})") from None
    try:
        manifest = _export_into(weights, stage, formats, fp16, int8_data, vae)
        replace_folder(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _export_into(weights: Path | None, out: Path, formats, fp16: bool, int8_data: Path | None,
                 vae: Path | None) -> dict:
    import onnx
    import onnxruntime

    manifest = {"labels": list(CLASS_NAMES), "image_size": 64, "image_range": [-1, 1], "models": {},
                "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}}
    nets = collect(weights, vae)
    for name, (module, ex, check, outputs, extra) in nets.items():
        if "onnx" in formats:
            manifest["models"][name] = {**export_onnx(module, ex, outputs, out / f"{name}.onnx", check), **extra}
            if fp16:
                manifest["models"][f"{name}_fp16"] = {
                    **export_onnx_fp16(out / f"{name}.onnx", out / f"{name}.fp16.onnx", check, module), **extra}
        if "torchscript" in formats:
            manifest["models"][f"{name}_ts"] = {**export_torchscript(module, ex, out / f"{name}.ts", check), **extra}
        print(f"{name}: exported ({', '.join(formats)})")
    (out / "labels.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    if "denoiser" in nets and nets["denoiser"][0].cfg.layout:  # the placement prior the samplers draw places from
        manifest["layout_bank"] = {"file": BANK_FILE, "sha256": sha256(nets["denoiser"][0].layout_bank.save(out))}
        (out / "layout.txt").write_text(f"{nets['denoiser'][0].cfg.cond_dim}\n")  # the C++ sampler's row width
    if "generator" in nets and reads_layout(nets["generator"][0]):  # a layout student's own prior, in its own file
        path = nets["generator"][0].layout_bank.save(out, GENERATOR_BANK_FILE)
        manifest["generator_layout_bank"] = {"file": GENERATOR_BANK_FILE, "sha256": sha256(path)}
    if "denoiser" in nets:  # the schedule as a table, for the C++ sampler
        s = Schedule(**nets["denoiser"][4]["schedule"])
        c, h, w = nets["decoder"][4]["latent_shape"]
        (out / "schedule.txt").write_text(f"{s.T} {c} {h} {w} {s.prediction}\n"
                                          + "\n".join(f"{v:.17g}" for v in s.alpha_bar) + "\n")
    if "onnx" in formats and int8_data is not None:
        from export.quantize import quantize_export

        quantize_export(out, manifest, int8_data, Path(vae) if vae else _weights(weights, "vae"))
    if "onnx" in formats:
        build_tensorrt(out, manifest)
    tmp = out / ".manifest.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return manifest


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, help="weights folder (default: the shipped weights/)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--vae", type=Path, help="VAE folder whose decoder to export (default: the weights folder's "
                        "vae/; e.g. a cheaper decoder from train_decoder, same latent space)")
    parser.add_argument("--format", choices=("onnx", "torchscript", "both"), default="onnx")
    parser.add_argument("--fp16", action="store_true", help="also write float16 ONNX copies (for GPU providers)")
    parser.add_argument("--int8", action="store_true", help="also write int8 ONNX copies of the decoder, denoiser, "
                        "generator and classifier (for CPUs with VNNI), calibrated on --data's latents")
    parser.add_argument("--data", type=Path, help="dataset whose training latents calibrate --int8")
    parser.add_argument("--triton", type=Path, metavar="DIR", help="also write a Triton Inference Server model repository")
    parser.add_argument("--triton-cpu", action="store_true", help="Triton instances on CPU instead of GPU")
    args = parser.parse_args(argv)
    formats = ("onnx", "torchscript") if args.format == "both" else (args.format,)
    if args.triton and "onnx" not in formats:
        raise UserError("--triton needs the ONNX models: use --format onnx or both")
    if args.int8 and ("onnx" not in formats or args.data is None):
        raise UserError("--int8 needs the ONNX models (--format onnx or both) and --data DIR (a dataset whose "
                        "training images calibrate the int8 ranges)")
    m = export_all(args.weights, args.out, formats, fp16=args.fp16, int8_data=args.data if args.int8 else None,
                   vae=args.vae)
    print(f"wrote {args.out / 'manifest.json'} ({len(m['models'])} models)")
    if args.triton:
        from export.triton_repo import write_repository

        names = write_repository(args.out, args.triton, gpu=not args.triton_cpu)
        print(f"wrote Triton model repository {args.triton}: {', '.join(names)}")


if __name__ == "__main__":
    main()
