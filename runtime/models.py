"""An export folder (manifest.json + ONNX files) opened as ONNX Runtime sessions."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from python.core.checksum import sha256
from python.core.errors import UserError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_EXPORT = REPO / "exports" / "default"
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PRECISIONS = ("fp32", "fp16", "int8")


def pick_providers(requested: list[str] | None = None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        bad = [p for p in requested if p not in available]
        if bad:
            raise UserError(f"execution provider(s) {bad} not available; available: {available}")
        return requested
    return [p for p in PROVIDER_ORDER if p in available]


class ExportFolder:
    """Reads manifest.json; opens each model's session lazily."""

    def __init__(self, path: Path | None = None, providers: list[str] | None = None, threads: int | None = None,
                 precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.path = Path(path) if path else DEFAULT_EXPORT
        mf = self.path / "manifest.json"
        if not mf.exists():
            raise UserError(f"{self.path}: no manifest.json; create the export with `python export/to_onnx.py"
                                f" --out {self.path}`")
        try:
            self.manifest = json.loads(mf.read_text())
            self.labels: list[str] = self.manifest["labels"]
            assert isinstance(self.manifest["models"], dict)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as e:
            raise UserError(f"{mf}: not an export manifest ({type(e).__name__}: {e}); re-export with "
                            f"`python export/to_onnx.py --out {self.path}`") from None
        self.providers = pick_providers(providers)
        self.threads = threads or os.cpu_count()
        self._sessions = {}

    def has(self, name: str) -> bool:
        return self.manifest["models"].get(name, {}).get("format") == "onnx"

    def session(self, name: str):
        if name not in self._sessions:
            if not self.has(name):
                onnx_models = [k for k, v in self.manifest["models"].items() if v.get("format") == "onnx"]
                raise UserError(f"{self.path}: no ONNX model {name!r} in the manifest; it has {onnx_models}")
            import onnxruntime as ort

            entry = self.manifest["models"][name]
            if self.precision != "fp32":  # the fp16 / int8 copy where the export has one (export --fp16 / --int8)
                entry = self.manifest["models"].get(f"{name}_{self.precision}", entry)
            path = self.path / entry["file"]
            if not path.exists():
                raise UserError(f"{path}: listed in manifest.json but missing; re-export with `python export/to_onnx.py "
                                f"--out {self.path}`")
            if "sha256" in entry and sha256(path) != entry["sha256"]:
                raise UserError(f"{path}: its checksum differs from manifest.json's (a partial, mixed or damaged "
                                f"export); re-export with `python export/to_onnx.py --out {self.path}`")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._sessions[name] = ort.InferenceSession(str(path), opts, providers=self.providers)
        return self._sessions[name]

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session(name).run(None, feeds)
