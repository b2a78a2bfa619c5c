"""An export folder (manifest.json + ONNX files) opened as ONNX Runtime sessions."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from python.core.checksum import sha256
from python.core.errors import UserError
from python.core.layout import LayoutBank

REPO = Path(__file__).resolve().parent.parent
DEFAULT_EXPORT = REPO / "exports" / "default"
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = ("onnxruntime", "openvino")  # the engines that run an export folder's graphs on the CPU (ONNX Runtime: and GPU)


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVINOSession:
    """An OpenVINO model compiled for the CPU behind ONNX Runtime's call, run(None, feeds) -> [outputs]: the
    pipelines and the samplers take either. fp32 arithmetic is asked for explicitly (INFERENCE_PRECISION_HINT): on a
    CPU with AVX-512 BF16 or AMX OpenVINO would otherwise run float graphs in bf16; int8 graphs keep their int8 ops."""

    def __init__(self, path: Path, threads: int):
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()
        self.outputs = list(self.compiled.outputs)

    def run(self, _names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds)  # copies out of the request's buffers (share_outputs=False)
        return [result[o] for o in self.outputs]


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
                 precision: str = "fp32", backend: str = "onnxruntime"):
        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if backend not in BACKENDS:
            raise UserError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "openvino":
            if not openvino_available():
                raise UserError("backend openvino: the openvino package is not installed (pip install openvino)")
            if precision == "fp16":
                raise UserError("backend openvino runs fp32 or int8 on the CPU; fp16 copies are for GPU providers "
                                "(--backend onnxruntime with CUDA or TensorRT)")
            if providers:
                raise UserError("execution providers are ONNX Runtime's; backend openvino takes none")
        self.precision, self.backend = precision, backend
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
        if precision != "fp32" and not self.has_copies(precision):
            # each model falls back to fp32 where its copy was refused; an export with no copy at all would run
            # fp32 throughout under a precision the user asked for by name
            flag = "--fp16" if precision == "fp16" else "--int8 --data DIR"
            raise UserError(f"{self.path}: precision {precision}: this export has no {precision} copies; export them "
                            f"with `python export/to_onnx.py --out {self.path} {flag}`, or run fp32")
        self.providers = pick_providers(providers) if backend == "onnxruntime" else ["OpenVINO CPU"]
        self.threads = threads or os.cpu_count()
        self._sessions, self._banks = {}, {}

    def has(self, name: str) -> bool:
        return self.manifest["models"].get(name, {}).get("format") == "onnx"

    def has_copies(self, precision: str) -> bool:
        """Whether the export holds any model's copy at `precision` (fp16 / int8; OpenVINO's NNCF int8 ones too)."""
        return any(k.endswith(f"_{precision}") for k in self.manifest["models"])

    @property
    def layout_bank(self):
        """The placement prior of a layout denoiser (python/core/layout.py), checked against the manifest; None for
        a denoiser that reads the label set alone."""
        return self._bank("layout_bank")

    @property
    def generator_layout_bank(self):
        """The same for a layout GAN-path generator (a one-step student of a layout LDM)."""
        return self._bank("generator_layout_bank")

    def _bank(self, key: str):
        entry = self.manifest.get(key)
        if entry is None:
            return None
        if key not in self._banks:
            path = self.path / entry["file"]
            if path.exists() and sha256(path) != entry.get("sha256"):
                raise UserError(f"{path}: its checksum differs from manifest.json's (a partial, mixed or damaged "
                                f"export); re-export with `python export/to_onnx.py --out {self.path}`")
            self._banks[key] = LayoutBank.load(self.path, entry["file"])
        return self._banks[key]

    def session(self, name: str):
        if name not in self._sessions:
            if not self.has(name):
                onnx_models = [k for k, v in self.manifest["models"].items() if v.get("format") == "onnx"]
                raise UserError(f"{self.path}: no ONNX model {name!r} in the manifest; it has {onnx_models}")
            entry = self.entry(name)
            for file, digest in ((entry["file"], entry.get("sha256")), (entry.get("weights_file"), entry.get("weights_sha256"))):
                if file is None:
                    continue
                path = self.path / file
                if not path.exists():
                    raise UserError(f"{path}: listed in manifest.json but missing; re-export with "
                                    f"`python export/to_onnx.py --out {self.path}`")
                if digest and sha256(path) != digest:
                    raise UserError(f"{path}: its checksum differs from manifest.json's (a partial, mixed or damaged "
                                    f"export); re-export with `python export/to_onnx.py --out {self.path}`")
            path = self.path / entry["file"]
            if self.backend == "openvino":
                try:
                    self._sessions[name] = OpenVINOSession(path, self.threads)
                except RuntimeError as e:
                    raise UserError(f"{path}: OpenVINO cannot load it ({str(e).splitlines()[0][:300]})") from None
                return self._sessions[name]
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._sessions[name] = ort.InferenceSession(str(path), opts, providers=self.providers)
        return self._sessions[name]

    def entry(self, name: str) -> dict:
        """The manifest entry of the file that runs `name` at this folder's precision on its backend: the precision's
        copy where the export has one (export --fp16 / --int8; for OpenVINO int8 its NNCF copy first, then the QDQ
        ONNX one, which OpenVINO also runs in int8), else the fp32 model."""
        models = self.manifest["models"]
        if self.precision == "fp32":
            return models[name]
        if self.backend == "openvino" and f"{name}_ov_int8" in models:
            return models[f"{name}_ov_int8"]
        return models.get(f"{name}_{self.precision}", models[name])

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session(name).run(None, feeds)
