"""An NVIDIA Triton Inference Server model repository from an export folder: the scale-out path.

    python export/to_onnx.py --out exports/default --triton exports/triton
    tritonserver --model-repository exports/triton        # on a machine with Triton (not run here)

Layout (Triton's): one folder per model with config.pbtxt and a version folder 1/.
- judge, judge2, decoder, denoiser, generator, class_grad: the ONNX files (onnxruntime_onnx backend), dynamic
  batching on,
  inputs and outputs read from the ONNX graphs.
- ldm: a Python-backend model that runs the project's sampling loop (the numpy core, python/core/, copied beside
  model.py as core/) and calls denoiser, class_grad and decoder through Triton (BLS), so they batch across
  requests on the GPU. Inputs COND (24 multi-hot), SEED, and optional STEPS, GUIDANCE, APG_NORM, CLASS_SCALE,
  CLASS_ITERS; output IMAGES. A layout denoiser's placement prior (layouts.npz, python/core/layout.py) is copied
  beside model.py, and each request's places are drawn from its SEED, as the runtime draws them.
- gan: an ensemble, generator -> decoder (inputs Z, COND; output IMAGES). For a layout generator (a one-step
  student of a layout LDM) a Python-backend model instead, like ldm: inputs COND (24 multi-hot) and SEED, the noise
  and each row's places drawn from SEED as the runtime draws them (its prior copied beside model.py), one BLS call
  to generator and one to decoder.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from python.core.checksum import sha256
from python.core.diffusion import DEFAULT_APG_NORM, DEFAULT_CLASS_ITERS, DEFAULT_CLASS_SCALE, DEFAULT_GUIDANCE
from python.core.errors import UserError
from python.core.layout import BANK_FILE, GENERATOR_BANK_FILE

CORE = Path(__file__).resolve().parent.parent / "python" / "core"
ONNX_TYPES = {1: "TYPE_FP32", 7: "TYPE_INT64", 6: "TYPE_INT32", 10: "TYPE_FP16"}
MAX_BATCH = 256


def _tensor(name: str, dtype: str, dims: list[int], reshape: list[int] | None = None) -> str:
    extra = f", reshape: {{ shape: [ {', '.join(map(str, reshape))} ] }}" if reshape is not None else ""
    return f'  {{ name: "{name}", data_type: {dtype}, dims: [ {", ".join(map(str, dims))} ]{extra} }}'


def io_of(onnx_path: Path) -> tuple[list, list]:
    """[(name, triton type, dims without the batch axis)] for the graph's inputs and outputs."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph

    def rows(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.dim_value else -1 for d in t.shape.dim][1:]
            if t.elem_type not in ONNX_TYPES:
                raise UserError(f"{onnx_path}: tensor {v.name} has ONNX type {t.elem_type}, not one Triton config "
                                f"here maps ({sorted(ONNX_TYPES)})")
            out.append((v.name, ONNX_TYPES[t.elem_type], dims))
        return out

    return rows(g.input), rows(g.output)


def onnx_config(name: str, onnx_path: Path, gpu: bool = True) -> str:
    inputs, outputs = io_of(onnx_path)

    def block(rows):  # per-sample scalars (the denoiser's t) are [1] on the wire, reshaped to [] for the model
        return ",\n".join(_tensor(n, t, d if d else [1], None if d else []) for n, t, d in rows)

    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {MAX_BATCH}\n'
            f"input [\n{block(inputs)}\n]\noutput [\n{block(outputs)}\n]\n"
            "dynamic_batching { preferred_batch_size: [ 64, 128, 256 ] max_queue_delay_microseconds: 10000 }\n"
            f"instance_group [ {{ count: 1, kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]\n")


LDM_CONFIG = """name: "ldm"
backend: "python"
max_batch_size: {max_batch}
input [
  {{ name: "COND", data_type: TYPE_FP32, dims: [ 24 ] }},
  {{ name: "SEED", data_type: TYPE_INT64, dims: [ 1 ] }},
  {{ name: "STEPS", data_type: TYPE_INT32, dims: [ 1 ], optional: true }},
  {{ name: "GUIDANCE", data_type: TYPE_FP32, dims: [ 1 ], optional: true }},
  {{ name: "APG_NORM", data_type: TYPE_FP32, dims: [ 1 ], optional: true }},
  {{ name: "CLASS_SCALE", data_type: TYPE_FP32, dims: [ 1 ], optional: true }},
  {{ name: "CLASS_ITERS", data_type: TYPE_INT32, dims: [ 1 ], optional: true }}
]
output [
  {{ name: "IMAGES", data_type: TYPE_FP32, dims: [ 3, 64, 64 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: 10000 }}
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
parameters: {{ key: "sampler", value: {{ string_value: "dpmpp" }} }}
parameters: {{ key: "default_steps", value: {{ string_value: "20" }} }}
parameters: {{ key: "default_guidance", value: {{ string_value: "{guidance}" }} }}
parameters: {{ key: "default_apg_norm", value: {{ string_value: "{apg_norm}" }} }}
parameters: {{ key: "default_class_scale", value: {{ string_value: "{class_scale}" }} }}
parameters: {{ key: "default_class_iters", value: {{ string_value: "{class_iters}" }} }}
parameters: {{ key: "manifest", value: {{ string_value: {manifest} }} }}
"""

GAN_CONFIG = """name: "gan"
platform: "ensemble"
max_batch_size: {max_batch}
input [
  {{ name: "Z", data_type: TYPE_FP32, dims: [ {z_dim} ] }},
  {{ name: "COND", data_type: TYPE_FP32, dims: [ 24 ] }}
]
output [
  {{ name: "IMAGES", data_type: TYPE_FP32, dims: [ 3, 64, 64 ] }}
]
ensemble_scheduling {{
  step [
    {{ model_name: "generator", model_version: -1,
      input_map {{ key: "z", value: "Z" }} input_map {{ key: "cond", value: "COND" }}
      output_map {{ key: "latents", value: "LATENTS" }} }},
    {{ model_name: "decoder", model_version: -1,
      input_map {{ key: "latents", value: "LATENTS" }}
      output_map {{ key: "images", value: "IMAGES" }} }}
  ]
}}
"""

BLS_CALL = '''

def _call(model, inputs, output):
    req = pb_utils.InferenceRequest(model_name=model, requested_output_names=[output],
                                    inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()])
    resp = req.exec()
    if resp.has_error():
        raise pb_utils.TritonModelException(resp.error().message())
    return pb_utils.get_output_tensor_by_name(resp, output).as_numpy()


def _answer(responses, members, sample):
    """Fill responses[i] for the requests batched together, members [(i, cond, seed)]: each one's rows of sample()
    (the batch's images in member order), or, if sampling fails, the error for every member."""
    try:
        images = sample()
    except Exception as e:  # noqa: BLE001
        for i, _, _ in members:
            responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
        return
    start = 0
    for i, c, _ in members:
        out = pb_utils.Tensor("IMAGES", images[start:start + len(c)].astype(np.float32))
        responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
        start += len(c)
'''  # the Python backends' shared helpers: one call to another model of the repository; a batch's answers

GAN_LAYOUT_CONFIG = """name: "gan"
backend: "python"
max_batch_size: {max_batch}
input [
  {{ name: "COND", data_type: TYPE_FP32, dims: [ 24 ] }},
  {{ name: "SEED", data_type: TYPE_INT64, dims: [ 1 ] }}
]
output [
  {{ name: "IMAGES", data_type: TYPE_FP32, dims: [ 3, 64, 64 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: 10000 }}
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
parameters: {{ key: "z_dim", value: {{ string_value: "{z_dim}" }} }}
"""

GAN_LAYOUT_MODEL = '''"""Triton Python backend: a layout GAN-path generator (one call) and the decoder.

Written by export/triton_repo.py. The generator's condition rows carry each object's place, drawn from the
placement prior beside this file (core/layout.py) with the request's SEED, and its noise from the same SEED, as
the project's runtime draws both (core/sampling.py one_step_latents); every request in one execute() call is one
batch, each with its own seed, so a request's images do not depend on its batch-mates.
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_python_backend_utils as pb_utils  # noqa: E402

from core.layout import GENERATOR_BANK_FILE, LayoutBank  # noqa: E402
from core.sampling import one_step_latents  # noqa: E402
''' + BLS_CALL + '''

class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.z_dim = int(params["z_dim"])
        self.layout_bank = LayoutBank.load(Path(__file__).resolve().parent, GENERATOR_BANK_FILE)

    def execute(self, requests):
        members, responses = [], [None] * len(requests)
        for i, r in enumerate(requests):
            try:
                cond = pb_utils.get_input_tensor_by_name(r, "COND").as_numpy().astype(np.float32)
                seed = pb_utils.get_input_tensor_by_name(r, "SEED")
                seeds = np.unique(seed.as_numpy()) if seed is not None else np.zeros(1, np.int64)
                if len(seeds) != 1:
                    raise ValueError("SEED must be the same for every row of a request")
                self.layout_bank.draw(cond)  # a set the prior cannot place fails this request alone
                members.append((i, cond, int(seeds[0])))
            except Exception as e:  # noqa: BLE001 - one bad request fails alone
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
        if members:
            _answer(responses, members, lambda: self._sample(members))
        return responses

    def _sample(self, members):
        cond = np.concatenate([c for _, c, _ in members])
        generator = lambda z, c: _call("generator", {"z": z, "cond": c}, "latents")  # noqa: E731
        lat = one_step_latents(generator, cond, self.z_dim, seeds=[(s, len(c)) for _, c, s in members],
                               batch=len(cond), layout_bank=self.layout_bank)
        return _call("decoder", {"latents": lat.astype(np.float32)}, "images")
'''

LDM_MODEL = '''"""Triton Python backend: guided latent diffusion over the denoiser and decoder models.

Written by export/triton_repo.py. The sampling loop is the project's own (its numpy core, core/ beside this
file); each step is one BLS call to "denoiser" with the conditional and unconditional halves together.
Requests in one execute() call that share steps and guidance (GUIDANCE, and APG_NORM: adaptive projected
guidance's norm cap, 0 for classifier-free guidance; CLASS_SCALE: classifier guidance through "class_grad", 0 for
none, and 0 by default where the repository has no class_grad; CLASS_ITERS: its descent steps per sampler step) are
sampled as one batch, each with its own seed's noise, so a request's images do not depend on its batch-mates.
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_python_backend_utils as pb_utils  # noqa: E402

from core.diffusion import Schedule, check_apg_norm, check_class_iters, check_class_scale  # noqa: E402
from core.layout import BANK_FILE, LayoutBank  # noqa: E402
from core.sampling import diffusion_latents  # noqa: E402
''' + BLS_CALL + '''

class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        manifest = json.loads(params["manifest"])
        self.schedule = Schedule(**manifest["schedule"])
        self.shape = tuple(manifest["latent_shape"])
        self.sampler = params["sampler"]
        self.steps, self.guidance = int(params["default_steps"]), float(params["default_guidance"])
        self.apg_norm = float(params["default_apg_norm"])
        self.class_scale = float(params["default_class_scale"])
        self.class_iters = int(params["default_class_iters"])
        here = Path(__file__).resolve().parent  # a layout denoiser's placement prior, copied beside this file
        self.layout_bank = LayoutBank.load(here) if (here / BANK_FILE).exists() else None

    def _scalar(self, request, name, default, kind):
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is None:
            return default
        values = np.unique(t.as_numpy())
        if len(values) != 1:
            raise ValueError(f"{name} must be the same for every row of a request")
        return kind(values[0])

    def _sample(self, cond, parts, steps, guidance, apg_norm, class_scale, class_iters):
        def denoiser(x, t, cond):  # per-sample t is [1] on the wire
            return _call("denoiser", {"x": x, "t": t[:, None], "cond": cond}, "out")

        def class_grad(z, cond):
            return _call("class_grad", {"latents": z.astype(np.float32), "cond": cond}, "grad")

        lat = diffusion_latents(denoiser, self.schedule, cond, self.shape, self.sampler, steps, guidance,
                                seeds=parts, batch=len(cond), apg_norm=apg_norm,
                                class_grad=class_grad if class_scale else None, class_scale=class_scale,
                                class_iters=class_iters, layout_bank=self.layout_bank)
        return _call("decoder", {"latents": lat.astype(np.float32)}, "images")

    def execute(self, requests):
        groups, responses = {}, [None] * len(requests)
        for i, r in enumerate(requests):
            try:
                cond = pb_utils.get_input_tensor_by_name(r, "COND").as_numpy().astype(np.float32)
                seed = self._scalar(r, "SEED", 0, int)
                class_scale = check_class_scale(self._scalar(r, "CLASS_SCALE", self.class_scale, float), "CLASS_SCALE")
                class_iters = check_class_iters(self._scalar(r, "CLASS_ITERS", self.class_iters, int), "CLASS_ITERS")
                key = (self._scalar(r, "STEPS", self.steps, int), self._scalar(r, "GUIDANCE", self.guidance, float),
                       check_apg_norm(self._scalar(r, "APG_NORM", self.apg_norm, float), "APG_NORM"), class_scale,
                       class_iters if class_scale else 1)  # without classifier guidance the steps do not matter
                groups.setdefault(key, []).append((i, cond, seed))
            except Exception as e:  # noqa: BLE001 - one bad request fails alone
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
        for (steps, guidance, apg_norm, class_scale, class_iters), members in groups.items():
            _answer(responses, members, lambda: self._sample(  # called at once, within this iteration
                np.concatenate([c for _, c, _ in members]), [(s, len(c)) for _, c, s in members], steps, guidance,
                apg_norm, class_scale, class_iters))
        return responses
'''


def write_repository(export: Path, out: Path, gpu: bool = True) -> list[str]:
    """Write the model repository for the models of an export folder; returns the model names written."""
    export, out = Path(export), Path(out)
    mf = export / "manifest.json"
    if not mf.exists():
        raise UserError(f"{export}: no manifest.json (export the models first with export/to_onnx.py)")
    manifest_all = json.loads(mf.read_text())
    models = manifest_all["models"]
    onnx_models = [n for n in ("judge", "judge2", "decoder", "denoiser", "generator", "class_grad")
                   if models.get(n, {}).get("format") == "onnx"]
    if "decoder" not in onnx_models:
        raise UserError(f"{export}: the export has no decoder; a Triton repository needs at least the VAE decoder")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in onnx_models:
        src = export / models[name]["file"]
        if sha256(src) != models[name]["sha256"]:
            raise UserError(f"{src}: checksum differs from manifest.json; re-export")
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / name / "1" / "model.onnx")
        (out / name / "config.pbtxt").write_text(onnx_config(name, src, gpu))
        written.append(name)
    if "denoiser" in onnx_models:
        d = out / "ldm" / "1"
        d.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(d / "core", ignore_errors=True)  # the one copy of the maths, shipped beside the backend
        shutil.copytree(CORE, d / "core", ignore=shutil.ignore_patterns("__pycache__"))
        (d / "model.py").write_text(LDM_MODEL)
        (d / BANK_FILE).unlink(missing_ok=True)
        bank = manifest_all.get("layout_bank")
        if bank:  # a layout denoiser: the sampler draws each row's places from this prior (python/core/layout.py)
            src = export / bank["file"]
            if sha256(src) != bank["sha256"]:
                raise UserError(f"{src}: checksum differs from manifest.json; re-export")
            shutil.copyfile(src, d / BANK_FILE)
        manifest = {"schedule": models["denoiser"]["schedule"], "latent_shape": models["decoder"]["latent_shape"]}
        (out / "ldm" / "config.pbtxt").write_text(LDM_CONFIG.format(
            max_batch=MAX_BATCH, guidance=DEFAULT_GUIDANCE, apg_norm=DEFAULT_APG_NORM,
            class_scale=DEFAULT_CLASS_SCALE if "class_grad" in onnx_models else 0.0, class_iters=DEFAULT_CLASS_ITERS,
            manifest=json.dumps(json.dumps(manifest))))
        written.append("ldm")
    if "generator" in onnx_models:
        d = out / "gan" / "1"
        d.mkdir(parents=True, exist_ok=True)  # ensembles have an empty version folder
        for stale in ("model.py", GENERATOR_BANK_FILE):
            (d / stale).unlink(missing_ok=True)
        shutil.rmtree(d / "core", ignore_errors=True)
        bank = manifest_all.get("generator_layout_bank")
        config = GAN_CONFIG
        if bank:  # a layout generator: a Python backend draws each row's places (and noise) from its SEED
            src = export / bank["file"]
            if sha256(src) != bank["sha256"]:
                raise UserError(f"{src}: checksum differs from manifest.json; re-export")
            shutil.copyfile(src, d / GENERATOR_BANK_FILE)
            shutil.copytree(CORE, d / "core", ignore=shutil.ignore_patterns("__pycache__"))
            (d / "model.py").write_text(GAN_LAYOUT_MODEL)
            config = GAN_LAYOUT_CONFIG
        (out / "gan" / "config.pbtxt").write_text(config.format(max_batch=MAX_BATCH, z_dim=models["generator"]["z_dim"]))
        written.append("gan")
    return written
