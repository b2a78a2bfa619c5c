"""int8 copies of the exported ONNX models for CPUs with integer dot products (AVX-512 VNNI, AVX-VNNI, ARM dot).

    python export/to_onnx.py --int8 --data data/iclevr        # beside the fp32 models: <name>.int8.onnx

First static quantization in the QDQ format with ONNX Runtime: weights per channel (int8), activations (uint8) with
ranges calibrated (99.99th percentile of a histogram, so that rare outliers do not stretch them) on real inputs:
latents of training images from the latent cache for the decoder and the classifier, their noised versions at
random timesteps with their real label sets for the denoiser, noise and real label sets for the generator. Where
static misses the tolerance, dynamic quantization of the matrix products (int8 weights per channel, activations
quantized per batch as they come): the transformers' activations vary too much with the timestep and the label set
for fixed ranges. The judges stay fp32: they are the referee. Each int8 model is verified against its fp32 model
on inputs it was not calibrated on, and refused (not written) when its outputs differ by more than INT8_TOL
(relative RMS error).

Measured on the shipped weights (2026-12-02; heldout.json, 1,024 conditions): static decoder 4.1%, dynamic
generator 8.6% and denoiser 5.2% relative RMS (static: 15-17% and 11-14%); the int8 GAN path scored 0.932 against
0.936 in fp32, the int8 LDM (10 steps) 0.846 against 0.849. INT8_TOL is set from that: what keeps the accuracy
within 0.01 of fp32.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

from python.core.checksum import sha256
from python.core.diffusion import Schedule
from python.core.errors import UserError
from python.core.layout import LayoutBank
from python.core.noise import gan_noise
from python.training.latents import LatentSet, load_latents

INT8_TOL = 0.10  # relative RMS error of the outputs, int8 against fp32, on fresh inputs
# Only the operators with int8 kernels that carry the FLOPs; normalisations, softmax and element-wise maths stay fp32
# (quantizing them costs accuracy and buys no speed).
OPS = ["Conv", "ConvTranspose", "MatMul", "Gemm"]
QUANTIZED = ("decoder", "denoiser", "generator", "classifier")


class Feeds(CalibrationDataReader):
    """The calibration batches, one dict of named inputs at a time (ONNX Runtime's reader protocol)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self.batches = iter(batches)

    def get_next(self):
        return next(self.batches, None)


def model_inputs(name: str, manifest_entry: dict, lat: LatentSet, n: int, seed: int, batch: int = 32,
                 bank=None) -> list[dict]:
    """`n` real inputs for an exported network, in batches: what it sees when the generators run (`bank`: a layout
    denoiser's or generator's placement prior, python.core.layout, whose places join its conditions)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(lat), (n,), generator=gen)
    latents, labels = lat.sample(idx, gen).numpy(), lat.labels[idx].numpy()
    if name in ("decoder", "classifier"):
        feeds = {"latents": latents}
    elif name == "generator":
        rows = bank.condition_rows(labels, seed) if bank is not None else labels
        feeds = {"z": gan_noise(seed, n, manifest_entry["z_dim"]), "cond": rows}
    elif name == "denoiser":
        schedule = Schedule(**manifest_entry["schedule"])
        t = torch.randint(0, schedule.T, (n,), generator=gen).numpy()
        a, s = (c.astype(np.float32)[:, None, None, None] for c in schedule.coeffs(t))
        eps = torch.randn(latents.shape, generator=gen).numpy()
        drop = (torch.rand(n, generator=gen) < 0.5).numpy()  # guidance runs conditional and unconditional halves
        rows = bank.condition_rows(labels, seed) if bank is not None else labels
        feeds = {"x": a * latents + s * eps, "t": t.astype(np.int64), "cond": np.where(drop[:, None], 0, rows)}
    else:
        raise ValueError(f"no int8 calibration for {name!r}; quantized are {', '.join(QUANTIZED)}")
    feeds = {k: np.ascontiguousarray(v, np.int64 if k == "t" else np.float32) for k, v in feeds.items()}
    return [{k: v[i:i + batch] for k, v in feeds.items()} for i in range(0, n, batch)]


def relative_rms(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - ref) ** 2)) / max(np.sqrt(np.mean(ref ** 2)), 1e-12))


def quantize(src: Path, dst: Path, calibration: list[dict], verification: list[dict]) -> dict:
    """src (fp32 ONNX) -> dst (int8), static where that meets INT8_TOL on the verification inputs, else dynamic;
    the manifest entry. When neither does, dst is not written and a UserError says by how much each missed."""
    import onnxruntime as ort

    fp32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    refs = [fp32.run(None, feeds)[0] for feeds in verification]
    errors = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        for method in ("static", "dynamic"):
            if method == "static":
                quantize_static(str(prepared), str(dst), Feeds(calibration), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=OPS, calibrate_method=CalibrationMethod.Percentile,
                                extra_options={"CalibPercentile": 99.99})
            else:  # the matrix products only: dynamic quantization of a convolution is slower than fp32
                quantize_dynamic(str(prepared), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                                 op_types_to_quantize=["MatMul", "Gemm"])
            int8 = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
            errors[method] = max(relative_rms(int8.run(None, f)[0], r) for f, r in zip(verification, refs))
            if errors[method] <= INT8_TOL and int8_ops(dst):
                return {"file": dst.name, "format": "onnx-int8", "quantization": QUANTIZATION[method],
                        "calibration_batches": len(calibration) if method == "static" else 0,
                        "verified_rel_rms": errors[method], "tolerance": INT8_TOL, "sha256": sha256(dst),
                        "bytes": dst.stat().st_size}
    if dst.exists():
        os.remove(dst)
    raise UserError(f"{src.name}: no int8 copy within {INT8_TOL} relative RMS of fp32 on fresh inputs ("
                    + ", ".join(f"{m} {e:.3f}" for m, e in errors.items()) + "); not written")


QUANTIZATION = {"static": "static QDQ: per-channel int8 weights, uint8 activations (99.99th-percentile ranges)",
                "dynamic": "dynamic: per-channel int8 weights of MatMul/Gemm, activations quantized per batch"}


def int8_ops(path: Path) -> int:
    """How many nodes of an ONNX graph compute in int8 (a dynamic quantization of a graph without matrix products
    changes nothing, and is no int8 copy)."""
    import onnx

    return sum(n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                             "QLinearConv", "QLinearMatMul") for n in onnx.load(str(path)).graph.node)


def nncf_available() -> bool:
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _openvino_cpu(model, threads: int | None = None):
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    compiled = ov.Core().compile_model(model, "CPU", config)
    return lambda feeds: compiled(feeds)[compiled.outputs[0]]


def quantize_openvino(src: Path, dst: Path, calibration: list[dict], verification: list[dict],
                      transformer: bool) -> dict:
    """src (fp32 ONNX) -> dst (OpenVINO IR, .xml beside its .bin) quantized to int8 by NNCF's post-training
    quantization, calibrated on the same inputs as the ONNX Runtime copy (transformer models: NNCF's transformer
    scheme, which keeps the sensitive operations in floating point). Verified against fp32 like quantize(); not
    written (UserError) when it misses INT8_TOL."""
    import nncf
    import openvino as ov

    fp32 = ov.Core().read_model(str(src))
    ref = _openvino_cpu(fp32)
    refs = [ref(feeds) for feeds in verification]
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    q = nncf.quantize(fp32, nncf.Dataset(calibration), subset_size=len(calibration),  # items: batches, all of them
                      preset=nncf.QuantizationPreset.MIXED, **kwargs)
    run = _openvino_cpu(q)
    error = max(relative_rms(run(f), r) for f, r in zip(verification, refs))
    if error > INT8_TOL:
        raise UserError(f"{src.name}: the NNCF int8 copy misses {INT8_TOL} relative RMS of fp32 on fresh inputs "
                        f"({error:.3f}); not written")
    ov.save_model(q, str(dst), compress_to_fp16=False)
    weights = dst.with_suffix(".bin")
    return {"file": dst.name, "weights_file": weights.name, "format": "openvino-int8",
            "quantization": "NNCF post-training: int8 weights (per channel) and activations, mixed preset"
                            + (", transformer scheme" if transformer else ""),
            "calibration_batches": len(calibration), "verified_rel_rms": error, "tolerance": INT8_TOL,
            "sha256": sha256(dst), "weights_sha256": sha256(weights), "bytes": dst.stat().st_size + weights.stat().st_size}


def quantize_export(out: Path, manifest: dict, data: Path, vae_dir: Path, samples: int = 512,
                    openvino: bool | None = None) -> None:
    """An int8 copy (<name>.int8.onnx, manifest entry <name>_int8) of every quantizable model in the export, and
    where NNCF and OpenVINO are installed (openvino=None: detect) an OpenVINO one (<name>.ov-int8.xml/.bin,
    <name>_ov_int8)."""
    lat = load_latents(data, vae_dir)
    if openvino is None:
        openvino = nncf_available()
        if not openvino:
            print("OpenVINO int8 copies: nncf / openvino not installed; skipped (pip install openvino nncf)")
    for name in [n for n in QUANTIZED if manifest["models"].get(n, {}).get("format") == "onnx"]:
        entry = manifest["models"][name]
        bank = LayoutBank.load(out, entry["layout"]) if entry.get("layout") else None
        calibration = model_inputs(name, entry, lat, samples, seed=1, bank=bank)
        verification = model_inputs(name, entry, lat, 64, seed=2, bank=bank)
        keep = {k: v for k, v in entry.items() if k in ("schedule", "z_dim", "latent_shape", "layout")}
        try:
            q = quantize(out / entry["file"], out / f"{name}.int8.onnx", calibration, verification)
            manifest["models"][f"{name}_int8"] = {**q, **keep}
            print(f"{name}: int8 copy verified (relative RMS {q['verified_rel_rms']:.4f})")
        except UserError as e:  # that model runs in fp32 under --precision int8
            print(f"{name}: {e}")
        if openvino:
            try:
                q = quantize_openvino(out / entry["file"], out / f"{name}.ov-int8.xml", calibration, verification,
                                      transformer=name in ("denoiser", "generator"))
                manifest["models"][f"{name}_ov_int8"] = {**q, **keep}
                print(f"{name}: OpenVINO int8 copy verified (relative RMS {q['verified_rel_rms']:.4f})")
            except UserError as e:
                print(f"{name}: {e}")
