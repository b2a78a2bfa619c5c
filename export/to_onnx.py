"""Export the trained networks to ONNX (and TorchScript) with a manifest the runtime reads.

    python export/to_onnx.py [--weights DIR] [--out DIR] [--format onnx|torchscript|both]

Every export is checked (onnx.checker) and verified against torch on random inputs; the manifest
(manifest.json) lists each model's file, inputs, outputs, checksum and verification figure, plus
the label list, so the runtime needs nothing else. Networks whose weights do not exist yet are
skipped with a one-line notice.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as `python export/to_onnx.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn as nn

from python import judge as J
from python.errors import UserError, cli
from python.labels import CLASS_NAMES

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "exports" / "default"
OPSET = 17


class JudgeForExport(nn.Module):
    """The judge with two outputs: the official sigmoid probabilities and the logits.

    The runtime ranks by logits: the same order as the probabilities wherever those differ, and a
    defined order where float32 sigmoid saturates (several outputs exactly 1.0)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images):
        z = J.logits(self.net, images)
        return torch.sigmoid(z), z


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    ref = ref if isinstance(ref, tuple) else (ref,)
    err = max(float(np.abs(g - r.numpy()).max() / max(1.0, float(r.abs().max()))) for g, r in zip(got, ref))
    if err > 1e-4:
        raise RuntimeError(f"{path.name}: ONNX output differs from torch by {err:.2e} (relative), above 1e-4")
    return {"file": path.name, "format": "onnx", "opset": OPSET,
            "inputs": {k: {"shape": ["batch", *v.shape[1:]], "dtype": str(v.dtype).removeprefix("torch.")}
                       for k, v in inputs.items()},
            "outputs": outputs, "verified_max_rel_err": err, "sha256": sha256(path), "bytes": path.stat().st_size}


def export_torchscript(module: nn.Module, inputs: dict[str, torch.Tensor], path: Path,
                       check_inputs: dict[str, torch.Tensor]) -> dict:
    """Traced and frozen TorchScript, verified like the ONNX export."""
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.freeze(torch.jit.trace(module, tuple(inputs.values())))
        ts.save(str(path))
        got, ref = torch.jit.load(str(path))(*check_inputs.values()), module(*check_inputs.values())
    got, ref = (got, ref) if isinstance(ref, tuple) else ((got,), (ref,))
    err = max(float((g - r).abs().max() / max(1.0, float(r.abs().max()))) for g, r in zip(got, ref))
    if err > 1e-4:
        raise RuntimeError(f"{path.name}: TorchScript output differs from torch by {err:.2e} (relative)")
    return {"file": path.name, "format": "torchscript", "verified_max_rel_err": err, "sha256": sha256(path),
            "bytes": path.stat().st_size}


def judge_exports(weights: Path | None) -> dict[str, nn.Module]:
    """{"judge": primary, "judge2": second} for the judges whose weights exist."""
    found = {}
    for name, which in (("judge", "primary"), ("judge2", "second")):
        path = (Path(weights) / J.SHIPPED[which].parent.name / "judge.safetensors") if weights else J.SHIPPED[which]
        if path.exists():
            found[name] = JudgeForExport(J.load(path))
        else:
            print(f"{name}: no weights at {path}; skipped")
    return found


def export_all(weights: Path | None, out: Path, formats=("onnx",)) -> dict:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{out}: output folder is not writable ({e.strerror})") from None
    gen = torch.Generator().manual_seed(0)
    manifest = {"labels": list(CLASS_NAMES), "image_size": 64, "image_range": [-1, 1], "models": {},
                "versions": {"torch": torch.__version__}}
    import onnx
    import onnxruntime

    manifest["versions"].update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    for name, module in judge_exports(weights).items():
        ex = {"images": torch.randn(2, 3, 64, 64, generator=gen)}
        check = {"images": torch.randn(5, 3, 64, 64, generator=gen).clamp(-1, 1)}
        if "onnx" in formats:
            manifest["models"][name] = export_onnx(module, ex, ["probs", "logits"], out / f"{name}.onnx", check)
        if "torchscript" in formats:
            manifest["models"][f"{name}_ts"] = export_torchscript(module, ex, out / f"{name}.ts", check)
        print(f"{name}: exported ({', '.join(formats)})")
    tmp = out / ".manifest.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return manifest


@cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, help="weights folder (default: the shipped weights/)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--format", choices=("onnx", "torchscript", "both"), default="onnx")
    a = p.parse_args(argv)
    if a.weights and not a.weights.is_dir():
        raise UserError(f"{a.weights}: weights folder not found")
    formats = ("onnx", "torchscript") if a.format == "both" else (a.format,)
    m = export_all(a.weights, a.out, formats)
    print(f"wrote {a.out / 'manifest.json'} ({len(m['models'])} models)")


if __name__ == "__main__":
    main()
