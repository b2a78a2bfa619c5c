"""Images/sec and the accuracy they buy, every backend side by side in one run, against the course-style
baseline and this machine's measured matmul peak.

    python bench/latency.py [--quick] [--weights weights] [--data data/iclevr] [--json out.json] [--plot out.png]

Throughput is end to end (noise -> decoded 64x64 images): the median of --runs timed runs after one warm-up,
with min and max; batch 1 also gives latency p50/p95. Accuracy (primary judge, second judge beside it) is
measured once per model and sampler setting, on test.json, new_test.json and heldout.json, with the ONNX
models (backends are parity-tested against each other, so they buy the same accuracy), and beside each accuracy
its fidelity (python/evaluation/fidelity.py: KID, FD, precision / recall, object figures; floors once per file).
--quick scores the first 128 conditions of each file (stated in the output). The baseline is a
pixel-space diffusers UNet2DModel (64,128,256,512) at 64x64 with 1000 DDPM steps: one step is timed and
multiplied by 1000 (weights untrained: only its cost matters). FLOPs per image are counted with torch's
FLOP counter (matmuls and convolutions) and set against the peak measured here for the same precision.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from python.core.diffusion import (  # noqa: E402
    DEFAULT_APG_NORM,
    DEFAULT_CLASS_ITERS,
    DEFAULT_CLASS_SCALE,
    DEFAULT_GUIDANCE,
    Schedule,
    check_apg_norm,
    check_class_iters,
    check_class_scale,
    check_eta,
)
from python.core.errors import UserError, cli  # noqa: E402
from python.core.labels import NUM_CLASSES, load_conditions  # noqa: E402
from python.core.memory import keep_freed_memory  # noqa: E402
from python.core.noise import gan_noise, initial_noise  # noqa: E402
from python.core.sampling import diffusion_latents  # noqa: E402
from runtime.generate import Pipeline  # noqa: E402
from runtime.judge import accuracy  # noqa: E402
from runtime.models import ExportFolder, openvino_available  # noqa: E402

CONDITION_FILES = ("test.json", "new_test.json", "heldout.json")
QUICK = dict(ldm=[("dpmpp", 10)], ldm_backends=["torch-fp32", "onnxruntime", "onnxruntime-int8", "openvino",
                                                 "openvino-int8", "cpp"],
             ldm_batches=[32], gan_backends=["torch-fp32", "onnxruntime", "onnxruntime-int8", "openvino",
                                             "openvino-int8"], gan_batches=[256],
             latency_backends=["onnxruntime"],
             files=CONDITION_FILES, limit=128, baseline_batch=4, runs=5, latency_runs=5)
FULL = dict(ldm=[(s, n) for s in ("ddim", "dpmpp") for n in (10, 25, 50)],
            ldm_backends=["torch-fp32", "torch-bf16", "torchscript", "onnxruntime", "onnxruntime-int8", "openvino",
                          "openvino-int8", "cpp"],
            ldm_batches=[32, 256], gan_backends=["torch-fp32", "torch-bf16", "torchscript", "onnxruntime",
                                                 "onnxruntime-int8", "openvino", "openvino-int8"], gan_batches=[1, 32, 256],
            latency_backends=["torch-fp32", "torch-bf16", "torchscript", "onnxruntime", "onnxruntime-int8", "openvino",
                              "openvino-int8"], files=CONDITION_FILES, limit=None, baseline_batch=16,
            runs=5, latency_runs=20)


BACKENDS = ("torch-fp32", "torch-bf16", "torchscript", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-int8",
            "cpp")
PRECISION = {"torch-bf16": "bf16", "onnxruntime-int8": "int8", "openvino-int8": "int8"}  # of the arithmetic; else fp32
# the runtime pipeline (Models.pipes) each export-folder backend runs, and whose accuracy its rows carry: OpenVINO fp32
# runs the same fp32 graphs as ONNX Runtime (parity-tested, to 1e-3), so it carries theirs; each int8 backend has its
# own quantized copies, so its own accuracy
PIPE = {"onnxruntime": "fp32", "onnxruntime-int8": "int8", "openvino": "ov-fp32", "openvino-int8": "ov-int8"}
ACCURACY_OF = {"onnxruntime-int8": "int8", "openvino-int8": "ov-int8"}


def restrict(cfg: dict, args) -> dict:
    """The matrix narrowed by the command line (the full matrix takes about an hour and a half on 2 cores)."""
    if args.samplers or args.steps:
        if args.samplers:  # each sampler asked for, at the matrix's step counts (--quick's holds DPM-Solver++ only)
            cfg["ldm"] = sorted({(s, n) for s in args.samplers for _, n in cfg["ldm"]})
        if args.steps:
            cfg["ldm"] = sorted({(s, n) for s, _ in cfg["ldm"] for n in args.steps})
        if not cfg["ldm"]:
            raise UserError("--samplers/--steps leave no LDM setting to measure")
    if args.eta and "ddim" not in {s for s, _ in cfg["ldm"]}:
        raise UserError(f"--eta {args.eta} is DDIM's noise, and the LDM settings measured "
                        f"({', '.join(sorted({s for s, _ in cfg['ldm']}))}) hold no DDIM; add --samplers ddim")
    if args.backends:
        cfg["ldm_backends"] = list(args.backends)
        cfg["gan_backends"] = [b for b in args.backends if b != "cpp"]  # the C++ path is the LDM's
        cfg["latency_backends"] = [b for b in cfg["latency_backends"] if b in args.backends]
    if args.batches:
        if min(args.batches) < 1:
            raise UserError("--batches must be >= 1")
        cfg["ldm_batches"] = cfg["gan_batches"] = sorted(set(args.batches))
    if args.files:
        cfg["files"] = tuple(args.files)
    if args.no_latency:
        cfg["latency_backends"] = []
    return cfg


def peak_matmul(dtype: str, n: int = 2048, reps: int = 10) -> float:
    """Best-of FLOP/s of an n x n matmul in torch: the roof the models are held against."""
    import torch

    if dtype == "int8":  # int8 x int8 -> int32 (VNNI where the CPU has it), counted as 2 ops per multiply-add
        a, b = (torch.randint(-128, 128, (n, n), dtype=torch.int8) for _ in range(2))
        mm = torch._int_mm
    else:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        mm = torch.matmul
    mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def flops_per_item(module, *inputs) -> float:
    """FLOPs (2 x multiply-adds of matmuls and convolutions) of one forward, per batch item."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:  # (under no_grad its module tracker trips on parameters)
        module(*inputs)
    return fc.get_total_flops() / len(inputs[0])


class PeakRSS:
    """Peak resident memory of this process while the block runs (polls /proc; 0 where there is none)."""

    def __enter__(self):
        self.peak, self._stop = self._rss(), threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _rss(self) -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def timed(fn, runs: int) -> list[float]:
    fn()  # warm-up: first-call allocation, lazy session creation, oneDNN primitive caches
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


class Models:
    """The torch models of a weights folder and their exports (ONNX + TorchScript) in one place."""

    def __init__(self, weights: Path, export: Path | None, threads: int, data: Path | None = None,
                 vae: Path | None = None):
        import torch

        from export.to_onnx import export_all
        from python.models.denoiser import load_denoiser
        from python.models.generators import load_generator
        from python.models.vae import Decoder, load_vae

        torch.set_num_threads(threads)
        self.weights = weights
        if export is None:
            # removed when this object goes (~100 MB a run; mkdtemp left one behind per benchmark)
            self._export_dir = tempfile.TemporaryDirectory(prefix="bench-export-")
            export = Path(self._export_dir.name)
            int8 = data if data is not None and (data / "train.json").exists() else None
            print(f"exporting {weights} to {export} (ONNX + TorchScript" + (", int8 copies" if int8 else "") + ")",
                  flush=True)
            export_all(weights, export, formats=("onnx", "torchscript"), int8_data=int8, vae=vae)
        self.export = export
        self.pipes = {"fp32": Pipeline(ExportFolder(export, threads=threads))}
        has_int8 = self.pipes["fp32"].ex.has_copies("int8")
        if has_int8:
            self.pipes["int8"] = Pipeline(ExportFolder(export, threads=threads, precision="int8"))
        if openvino_available():
            self.pipes["ov-fp32"] = Pipeline(ExportFolder(export, threads=threads, backend="openvino"))
            if has_int8:  # the openvino-int8 rows are left out below where the export has no int8 copies
                self.pipes["ov-int8"] = Pipeline(ExportFolder(export, threads=threads, precision="int8",
                                                              backend="openvino"))
        self.pipe = self.pipes["fp32"]
        self.vae = Path(vae) if vae else weights / "vae"
        self.decoder = Decoder(load_vae(self.vae)).eval()
        self.ldm = self.gan = None
        if (weights / "ldm" / "config.json").exists():
            self.ldm, cfg = load_denoiser(weights / "ldm")
            self.schedule = Schedule(**cfg["schedule"])
        if (weights / "gan" / "config.json").exists():
            self.gan, _ = load_generator(weights / "gan")
        self.class_grad = None
        if (weights / "guide" / "config.json").exists():
            from python.models.classifier import load_class_grad

            self.class_grad = load_class_grad(weights / "guide", self.vae)
        self.ts = {}
        for name in ("denoiser", "decoder", "generator", "class_grad"):
            if (export / f"{name}.ts").exists():
                self.ts[name] = torch.jit.load(str(export / f"{name}.ts")).eval()
        self.shape = tuple(self.pipe.latent_shape)


def ldm_runner(m: Models, backend: str, sampler: str, steps: int, guidance: float, cond: np.ndarray,
               best_of: int = 1, apg_norm: float = DEFAULT_APG_NORM, class_scale: float = DEFAULT_CLASS_SCALE,
               class_iters: int = DEFAULT_CLASS_ITERS, eta: float = 0.0):
    """fn() -> images for the LDM on one backend, from fixed noise, guided by `guidance` with `apg_norm` and
    `class_scale`, `class_iters` (classifier guidance through the guidance classifier's gradient); `eta`: DDIM's
    stochastic update (the other samplers ignore it; its step noise is seed 0's, python.core.noise, on every
    backend); best_of > 1
    (ONNX Runtime only) draws that many candidates per condition and keeps the latent classifier's pick
    (python/core/best_of.py)."""
    import torch

    from python.models.sampling import torch_call

    x_T = initial_noise(0, len(cond), m.shape)
    if best_of > 1:
        if backend != "onnxruntime":
            raise UserError(f"best-of-N is timed on the onnxruntime backend only, not {backend}")
        return lambda: m.pipe.generate(cond, "ldm", best_of, sampler=sampler, steps=steps, guidance=guidance,
                                       batch=len(cond), apg_norm=apg_norm, class_scale=class_scale,
                                       class_iters=class_iters, eta=eta)
    if backend in PIPE:
        pipe = m.pipes[PIPE[backend]]
        return lambda: pipe.decode(pipe.ldm_latents(cond, sampler, steps, guidance, x_T=x_T, batch=len(cond),
                                                    apg_norm=apg_norm, class_scale=class_scale,
                                                    class_iters=class_iters, eta=eta), batch=len(cond))
    if backend == "cpp":
        return None  # timed by the binary itself (cpp_times)
    bf16 = backend == "torch-bf16"
    model = m.ts["denoiser"] if backend == "torchscript" else m.ldm
    decoder = m.ts["decoder"] if backend == "torchscript" else m.decoder
    denoiser = torch_call(model, bf16=bf16)
    grad = None
    if class_scale:
        net = m.ts.get("class_grad") if backend == "torchscript" else m.class_grad
        if net is None:
            raise UserError(f"{backend}: no guidance classifier (weights/guide, class_grad.ts); give --class-scale 0")
        grad = torch_call(net, bf16=bf16)

    @torch.no_grad()
    def run():
        lat = diffusion_latents(denoiser, m.schedule, cond, m.shape, sampler, steps, guidance, eta, x_T=x_T,
                                batch=len(cond), apg_norm=apg_norm, class_grad=grad, class_scale=class_scale,
                                class_iters=class_iters, layout_bank=getattr(m.ldm, "layout_bank", None))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return decoder(torch.from_numpy(lat)).float()

    return run


def ddim_eta(sampler: str, eta: float) -> float:
    """The eta a row records: --eta for DDIM, 0 for the other samplers (python.core.diffusion.make_sampler gives eta to
    DDIM alone, so the samplers themselves need no such filter)."""
    return eta if sampler == "ddim" else 0.0


def gan_runner(m: Models, backend: str, cond: np.ndarray, best_of: int = 1):
    """fn() -> images for the GAN path on one backend; best_of > 1 (ONNX Runtime only) as ldm_runner's."""
    import torch

    if best_of > 1:
        if backend != "onnxruntime":
            raise UserError(f"best-of-N is timed on the onnxruntime backend only, not {backend}")
        return lambda: m.pipe.generate(cond, "gan", best_of, seed=0)
    if backend in PIPE:
        pipe = m.pipes[PIPE[backend]]
        return lambda: pipe.decode(pipe.gan_latents(cond, batch=len(cond)), batch=len(cond))
    bf16 = backend == "torch-bf16"
    gen = m.ts["generator"] if backend == "torchscript" else m.gan
    decoder = m.ts["decoder"] if backend == "torchscript" else m.decoder
    z = torch.from_numpy(gan_noise(0, len(cond), m.gan.cfg.z_dim))
    bank = getattr(m.gan, "layout_bank", None)  # a layout generator's rows carry the places (seed 0's)
    c = torch.from_numpy(bank.condition_rows(cond) if bank is not None else cond)

    @torch.no_grad()
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return decoder(gen(z, c)).float()

    return run


def cpp_times(m: Models, steps: int, guidance: float, cond: np.ndarray, runs: int,
              apg_norm: float = DEFAULT_APG_NORM, class_scale: float = DEFAULT_CLASS_SCALE,
              class_iters: int = DEFAULT_CLASS_ITERS, eta: float = 0.0) -> list[float] | None:
    """The C++ sampler's own timings (DDIM; with eta > 0 its step noise comes from its own seeded stream, drawn
    before the timed loop)."""
    binary = REPO / "build" / "ldm_sample"
    if not binary.exists():
        print(f"cpp: {binary} not built (make cpp); skipped")
        return None
    with tempfile.TemporaryDirectory() as d:
        if m.pipe.ex.layout_bank is not None:  # a layout denoiser: the rows carry the places (seed 0's)
            cond = m.pipe.ex.layout_bank.condition_rows(cond)
        cond.astype(np.float32).tofile(f"{d}/cond.f32")
        initial_noise(0, len(cond), m.shape).tofile(f"{d}/noise.f32")
        r = subprocess.run([str(binary), str(m.export), d, "--cond", f"{d}/cond.f32", "--noise", f"{d}/noise.f32",
                            "--steps", str(steps), "--guidance", str(guidance), "--apg-norm", str(apg_norm),
                            "--class-scale", str(class_scale), "--class-iters", str(class_iters),
                            "--repeat", str(runs + 1)] + (["--eta", str(eta)] if eta else []),
                           capture_output=True, text=True)
        if r.returncode:
            raise UserError(f"cpp runtime failed: {r.stderr.strip()}")
        return json.loads(r.stdout.splitlines()[0])["seconds"][1:]  # first run is the warm-up


def conditions_for(batch: int) -> np.ndarray:
    rng = np.random.default_rng(batch)
    cond = np.zeros((batch, NUM_CLASSES), np.float32)
    for row in cond:
        row[rng.choice(NUM_CLASSES, rng.integers(1, 4), replace=False)] = 1
    return cond


def fidelity_references(m: Models, data: Path, conds: dict[str, np.ndarray]) -> dict:
    """{file: python.evaluation.fidelity.Reference} for the files with enough conditions (torch judges and VAE of
    the weights folder: the features and the floors are the ones eval_gen reports)."""
    from python.evaluation.fidelity import MIN_IMAGES, load_reference
    from python.models.judge import load_judge
    from python.models.vae import load_vae

    judge2 = m.weights / "judge2" / "judge.safetensors"
    if not judge2.exists():
        print(f"fidelity: no second judge at {judge2} (its features are the fidelity space); left out")
        return {}
    feature_net, judge = load_judge(judge2), load_judge(m.weights / "judge" / "judge.safetensors")
    vae = load_vae(m.vae)  # the reconstruction floor through the decoder the generators use
    return {f: load_reference(data, f, c, feature_net, judge, vae) for f, c in conds.items() if len(c) >= MIN_IMAGES}


def accuracy_table(m: Models, data: Path, files, settings, guidance: float, limit: int | None = None,
                   fidelity: bool = True, apg_norm: float = DEFAULT_APG_NORM,
                   class_scale: float = DEFAULT_CLASS_SCALE, class_iters: int = DEFAULT_CLASS_ITERS,
                   eta: float = 0.0) -> tuple[dict, dict]:
    """({setting: {"primary": {file: acc}, "second": {file: acc}, "fidelity": {file: figures}}}, {file: floors})
    with the ONNX models of the setting's precision (its last field), on the first `limit` conditions of each file
    (all with None)."""
    import torch

    out = {}
    avail = [f for f in files if (data / f).exists()]
    if len(avail) < len(files):
        print(f"accuracy: no {sorted(set(files) - set(avail))} in {data} (run `make data`); left out")
    conds = {f: load_conditions(data / f)[:limit] for f in avail}
    references = fidelity_references(m, data, conds) if fidelity and settings else {}
    for key in settings:
        res = {"primary": {}, "second": {}, "fidelity": {}}
        for f, cond in conds.items():
            pipe = m.pipes[key[4]]
            if key[0] == "ldm":
                images = pipe.generate(cond, "ldm", key[3], sampler=key[1], steps=key[2], guidance=guidance, seed=0,
                                       apg_norm=apg_norm, class_scale=class_scale, class_iters=class_iters,
                                       eta=eta)
            else:
                images = pipe.generate(cond, "gan", key[3], seed=0)
            for which, name in (("primary", "judge"), ("second", "judge2")):
                if m.pipe.ex.has(name):
                    res[which][f] = round(accuracy(m.pipe.ex, images, cond, name), 4)
            if f in references:
                res["fidelity"][f] = references[f].figures(torch.from_numpy(images))
        out[key] = res
        print(f"accuracy {key}: " + ", ".join(f"{f} {v:.3f}" for f, v in res["primary"].items()) + "".join(
            f"; {f} KID x1000 {v['kid_x1000']:.1f}" for f, v in res["fidelity"].items()), flush=True)
    return out, {f: ref.floors for f, ref in references.items()}


def baseline(batch: int, runs: int) -> dict:
    """The course-style pixel-space UNet: one step timed, x 1000 DDPM steps."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(64, 128, 256, 512),
                       layers_per_block=2, class_embed_type="identity").eval()
    embed = torch.nn.Linear(24, 64 * 4)  # the multi-hot labels -> the time-embedding width
    x, t, c = torch.randn(batch, 3, 64, 64), torch.full((batch,), 500), torch.from_numpy(conditions_for(batch))

    def step():
        with torch.no_grad():
            return unet(x, t, class_labels=embed(c)).sample

    flops = flops_per_item(lambda x_: unet(x_, t, class_labels=embed(c)).sample, x)
    secs = timed(step, runs)
    per_step = float(np.median(secs))
    return {"params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2), "batch": batch,
            "step_seconds": [round(s, 4) for s in secs], "flops_per_image": 1000 * flops,
            "images_per_sec": batch / (1000 * per_step)}


def denoiser_feeds(m: Models, batch: int, guidance: float) -> dict[str, np.ndarray]:
    """One denoiser call's inputs for a sampler batch: 2 x batch rows with guidance (conditional and
    unconditional passes in one call), batch rows without."""
    passes = 2 if guidance != 1.0 else 1
    cond = conditions_for(batch)
    if m.pipe.ex.layout_bank is not None:  # a layout denoiser's rows carry the places too
        cond = m.pipe.ex.layout_bank.condition_rows(cond)
    return {"x": np.concatenate([initial_noise(0, batch, m.shape)] * passes),
            "t": np.full(passes * batch, 500, np.int64), "cond": np.concatenate([cond] * passes)}


def breakdown(m: Models, sampler: str, steps: int, guidance: float, batch: int, runs: int,
              backend: str = "onnxruntime", apg_norm: float = DEFAULT_APG_NORM,
              class_scale: float = DEFAULT_CLASS_SCALE, class_iters: int = DEFAULT_CLASS_ITERS,
              eta: float = 0.0) -> dict:
    """Where one LDM batch on an export-folder backend spends its time: the denoiser calls (one call per step, see
    denoiser_feeds), the decoder, and the rest (sampler arithmetic, noise, Python) = end to end minus both."""
    pipe = m.pipes[PIPE[backend]]
    feeds = denoiser_feeds(m, batch, guidance)
    cond, x_T = feeds["cond"][:batch], feeds["x"][:batch]
    den = float(np.median(timed(lambda: pipe.ex.run("denoiser", feeds), runs)))
    dec = float(np.median(timed(lambda: pipe.decode(x_T, batch=batch), runs)))
    total = float(np.median(timed(ldm_runner(m, backend, sampler, steps, guidance, cond, apg_norm=apg_norm,
                                             class_scale=class_scale, class_iters=class_iters, eta=eta), runs)))
    return {"sampler": sampler, "steps": steps, **time_split(batch, total, denoiser=den * steps, decoder=dec)}


def time_split(batch: int, total: float, **parts: float) -> dict:
    """{batch, total_s, <part>_s..., other_s (= total minus the parts), shares} of one timed batch."""
    secs = {**parts, "other": total - sum(parts.values())}
    return {"batch": batch, "total_s": round(total, 4), **{f"{k}_s": round(v, 4) for k, v in secs.items()},
            "shares": {k: round(round(v, 4) / total, 3) for k, v in secs.items()}}


def gan_breakdown(m: Models, batch: int, runs: int, backend: str = "onnxruntime") -> dict:
    """Where one GAN-path batch on an export-folder backend spends its time: the generator call, the decoder, and
    the rest (noise, Python) = end to end minus both."""
    pipe = m.pipes[PIPE[backend]]
    cond = conditions_for(batch)
    bank = pipe.ex.generator_layout_bank
    feeds = {"z": gan_noise(0, batch, pipe.ex.manifest["models"]["generator"]["z_dim"]),
             "cond": bank.condition_rows(cond) if bank is not None else cond}
    lat = pipe.ex.run("generator", feeds)[0]
    gen = float(np.median(timed(lambda: pipe.ex.run("generator", feeds), runs)))
    dec = float(np.median(timed(lambda: pipe.decode(lat, batch=batch), runs)))
    total = float(np.median(timed(gan_runner(m, backend, cond), runs)))
    return time_split(batch, total, generator=gen, decoder=dec)


def op_profile(module, *inputs, top: int = 8) -> list[dict]:
    """The torch operators that take the most self CPU time in one forward pass: [{op, share}], largest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        module(*inputs)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            module(*inputs)
    ev = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in ev) or 1.0
    return [{"op": k, "share": round(t / total, 3)} for k, t in sorted(ev, key=lambda e: -e[1])[:top]]


def record(model, backend, sampler, steps, batch, secs, flops, peak, rss, acc, baseline_rate, best_of=1,
           eta=0.0) -> dict:
    med = float(np.median(secs))
    ips = batch / med
    r = dict(model=model, backend=backend, precision=PRECISION.get(backend, "fp32"), sampler=sampler, steps=steps,
             best_of=best_of, batch=batch, **({"eta": eta} if eta else {}),
             images_per_sec=round(ips, 2),
             images_per_sec_min=round(batch / max(secs), 2), images_per_sec_max=round(batch / min(secs), 2),
             seconds=[round(s, 5) for s in secs], peak_rss_mb=round(rss / 2 ** 20, 1) if rss else None,
             flops_per_image=flops, achieved_flops=flops * ips if flops else None,
             fraction_of_peak=round(flops * ips / peak, 4) if flops else None,
             speedup_vs_baseline=round(ips / baseline_rate, 1) if baseline_rate else None,
             accuracy=acc["primary"] if acc else {}, accuracy_second_judge=acc["second"] if acc else {},
             fidelity=acc["fidelity"] if acc else {})
    if batch == 1:
        r["latency_ms_p50"] = round(1000 * float(np.percentile(secs, 50)), 2)
        r["latency_ms_p95"] = round(1000 * float(np.percentile(secs, 95)), 2)
    return r


def plot(results: list[dict], path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["images_per_sec"], r["accuracy"].get("heldout.json", r["accuracy"].get("test.json")), r)
           for r in results if r["accuracy"]]
    pts = [p for p in pts if p[1] is not None]
    backends = sorted({r["backend"] for _, _, r in pts})
    colours = {b: plt.cm.tab10(i % 10) for i, b in enumerate(backends)}
    markers = {"ldm": "o", "gan": "s"}
    fig, ax = plt.subplots(figsize=(8, 5))
    for x, y, r in pts:  # colour: backend; marker: model; size: batch
        ax.scatter(x, y, s=14 + 4 * np.log2(r["batch"]), color=colours[r["backend"]],
                   marker=markers.get(r["model"], "^"), alpha=0.85)
    front = sorted(pts, key=lambda p: -p[0])
    best, line = -1.0, []
    for x, y, r in front:  # Pareto front: nothing both faster and more accurate
        if y > best:
            best = y
            line.append((x, y))
            tag = f" best-of-{r['best_of']}" if r.get("best_of", 1) > 1 else ""
            label = f"{r['model']} {r['backend']} {sampler_label(r) or ''}{r['steps'] or ''}{tag} b{r['batch']}"
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, -10), textcoords="offset points")
    if line:
        ax.plot(*zip(*line), "k--", lw=0.8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=colours[b], label=b) for b in backends]
    handles += [Line2D([], [], ls="", marker=m, color="grey", label=k) for k, m in markers.items()]
    handles.append(Line2D([], [], ls="--", color="k", lw=0.8, label="Pareto front (labelled)"))
    ax.legend(handles=handles, loc="lower left", fontsize=7, title="marker size: batch", title_fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("images / sec (end to end, log scale)")
    ax.set_ylabel("accuracy (primary judge; heldout.json, else test.json)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced matrix; accuracy and fidelity on the first 128 "
                        "conditions of each file")
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--export", type=Path, help="existing export folder with ONNX and TorchScript (default: export "
                                               "the weights to a temporary folder first)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "iclevr", help="folder with the condition files")
    parser.add_argument("--vae", type=Path, help="VAE folder whose decoder the generators use (default: the weights "
                        "folder's vae/; e.g. weights/vae_fast, a cheaper decoder of the same latent space)")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--apg-norm", type=float, default=DEFAULT_APG_NORM,
                        help="adaptive projected guidance's norm cap (0: classifier-free guidance; inf: no cap)")
    parser.add_argument("--class-scale", type=float, default=DEFAULT_CLASS_SCALE,
                        help="classifier guidance on x_0 through weights/guide (0: none)")
    parser.add_argument("--class-iters", type=int, default=DEFAULT_CLASS_ITERS,
                        help="classifier guidance's descent steps on x_0 per sampler step")
    parser.add_argument("--eta", type=float, default=0.0,
                        help="DDIM's stochastic update for the DDIM rows, 0..1 (0: deterministic; needs DDIM among "
                             "the samplers: --quick times DPM-Solver++ only unless --samplers ddim)")
    parser.add_argument("--runs", type=int, help="timed runs per configuration (>= 5 unless testing)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown (for the README)")
    parser.add_argument("--samplers", nargs="+", choices=("ddim", "dpmpp"), help="restrict the LDM samplers")
    parser.add_argument("--steps", type=int, nargs="+", help="restrict the LDM step counts")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, help="restrict the backends")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes for throughput (batch 1 latency is separate)")
    parser.add_argument("--files", nargs="+", choices=CONDITION_FILES, help="condition files for accuracy")
    parser.add_argument("--best-of", type=int, nargs="+", default=[1],
                   help="best-of-N selection by the latent classifier, for the LDM (at each sampler's smallest step "
                        "count) and the GAN; N > 1 is measured on onnxruntime (its cost is N times that setting's)")
    parser.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency runs")
    parser.add_argument("--no-fidelity", action="store_true", help="skip the fidelity figures beside each accuracy")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                   help="measure nothing: redraw --plot and rewrite --markdown from an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.replot:
        try:
            out = json.loads(args.replot.read_text())
            out["results"], out["machine"]["processor"], out["machine"]["threads"], out["date"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--replot {args.replot}: not a bench/latency.py JSON ({e})") from None
        write_reports(out, args.markdown, args.plot)
        return out
    check_apg_norm(args.apg_norm, "--apg-norm")
    check_class_scale(args.class_scale, "--class-scale")
    check_class_iters(args.class_iters, "--class-iters")
    check_eta(args.eta, "--eta")
    cfg = restrict(dict(QUICK if args.quick else FULL), args)
    if args.runs:
        if args.runs < 1:
            raise UserError("--runs must be >= 1")
        cfg["runs"] = cfg["latency_runs"] = args.runs
    if not (args.weights / "vae" / "config.json").exists():
        raise UserError(f"{args.weights}: no VAE weights (vae/config.json); nothing to benchmark")
    malloc = keep_freed_memory()  # before anything is timed, so no backend's figure depends on what ran first
    import torch

    m = Models(args.weights, args.export, args.threads, args.data, args.vae)
    models = m.pipe.ex.manifest["models"]
    copies = {"onnxruntime-int8": {k.removesuffix("_int8") for k in models if k.endswith("_int8") and "_ov_" not in k},
              "openvino-int8": {k.split("_")[0] for k in models if k.endswith("_int8")}}
    if not openvino_available():
        print("openvino: the package is not installed (pip install openvino nncf); its rows are left out", flush=True)
        for key in ("ldm_backends", "gan_backends", "latency_backends"):
            cfg[key] = [b for b in cfg[key] if not b.startswith("openvino")]
    for key, needs in (("ldm_backends", {"denoiser", "decoder"}), ("gan_backends", {"generator", "decoder"})):
        for backend, have in copies.items():
            if backend in cfg[key] and not needs <= have:  # else its rows would time fp32 models
                print(f"{backend}: no int8 copy of {', '.join(sorted(needs - have))} in the export (export/to_onnx.py "
                      f"--int8 --data DIR); its {key.split('_')[0].upper()} rows are left out", flush=True)
                cfg[key] = [b for b in cfg[key] if b != backend]
    cfg["latency_backends"] = [b for b in cfg["latency_backends"] if b in cfg["ldm_backends"] + cfg["gan_backends"]]
    gpu = torch.cuda.is_available()
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
               "onnxruntime_providers": m.pipe.ex.providers, "gpu": torch.cuda.get_device_name() if gpu else None,
               "malloc": malloc}
    peak = {p: peak_matmul(p) for p in ("fp32", "bf16", "int8")}
    print(f"peak matmul (2048^3, {args.threads} threads): fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s, int8 {peak['int8'] / 1e9:.0f} GOP/s", flush=True)
    base = baseline(cfg["baseline_batch"], cfg["runs"])
    print(f"baseline (pixel UNet {base['params_m']}M, 1000 DDPM steps, batch {base['batch']}): "
          f"{base['images_per_sec']:.4f} images/s", flush=True)

    if min(args.best_of) < 1:
        raise UserError("--best-of must be >= 1")
    if max(args.best_of) > 1 and not m.pipe.ex.has("classifier"):
        raise UserError(f"--best-of > 1 needs the latent classifier, which {args.weights / 'classifier'} does not hold")
    best_ofs = sorted(set(args.best_of))
    fewest = {s: min(n for s2, n in cfg["ldm"] if s2 == s) for s, _ in cfg["ldm"]}
    ldm_settings = [(s, n, b) for s, n in cfg["ldm"] for b in best_ofs if b == 1 or n == fewest[s]]
    used = cfg["ldm_backends"] + cfg["gan_backends"]
    precisions = ["fp32"] + [ACCURACY_OF[b] for b in ACCURACY_OF if b in used]  # the pipelines whose accuracy is measured
    settings = (([("ldm", *c, p) for c in ldm_settings for p in precisions if p == "fp32" or c[2] == 1]
                 if m.ldm else []) + ([("gan", None, None, b, p) for b in best_ofs for p in precisions
                                      if p == "fp32" or b == 1] if m.gan else []))
    if not settings:
        print(f"{args.weights}: no LDM or GAN weights yet; only the baseline and the peak are measured")
    if cfg["limit"]:
        print(f"accuracy and fidelity on the first {cfg['limit']} conditions of each file (--quick)")
    acc, floors = accuracy_table(m, args.data, cfg["files"], settings, args.guidance, cfg["limit"],
                                 not args.no_fidelity, args.apg_norm, args.class_scale, args.class_iters, args.eta)
    dec_flops = flops_per_item(m.decoder, torch.randn(2, *m.shape))
    results = []
    cls_flops = 0.0
    if max(best_ofs) > 1:
        from python.models.classifier import load_classifier

        cls_flops = flops_per_item(load_classifier(args.weights / "classifier")[0], torch.randn(2, *m.shape))
    if m.ldm:
        den_flops = flops_per_item(m.ldm, torch.randn(2, *m.shape), torch.tensor([500, 500]),
                                   torch.zeros(2, m.ldm.cfg.cond_dim))  # a layout model reads places too
        grad_flops = (args.class_iters * flops_per_item(m.class_grad, torch.randn(2, *m.shape), torch.zeros(2, 24))
                      if args.class_scale and m.class_grad is not None else 0.0)
        for sampler, steps, best_of in ldm_settings:
            per_step = den_flops * (2 if args.guidance != 1.0 else 1) + grad_flops
            flops = (per_step * steps + cls_flops * (best_of > 1)) * best_of + dec_flops
            for backend in cfg["ldm_backends"] if best_of == 1 else ["onnxruntime"]:
                if backend == "cpp" and sampler != "ddim" and "ddim" in [s for s, _ in cfg["ldm"]]:
                    continue
                batches = sorted(set(cfg["ldm_batches"]) | ({1} if backend in cfg["latency_backends"] else set()))
                for batch in batches:
                    cond = conditions_for(batch)
                    runs = cfg["latency_runs"] if batch == 1 else cfg["runs"]
                    with PeakRSS() as mem:
                        if backend == "cpp":  # DDIM only; the quick matrix times it at the dpmpp step count
                            secs = cpp_times(m, steps, args.guidance, cond, runs, args.apg_norm, args.class_scale,
                                             args.class_iters, args.eta)
                            if secs is None:
                                continue
                        else:
                            secs = timed(ldm_runner(m, backend, sampler, steps, args.guidance, cond, best_of,
                                                    args.apg_norm, args.class_scale, args.class_iters, args.eta),
                                         runs)
                    smp = "ddim" if backend == "cpp" else sampler
                    prec = PRECISION.get(backend, "fp32")
                    results.append(record("ldm", backend, smp, steps, batch, secs, flops, peak[prec],
                                          mem.peak if backend != "cpp" else 0,
                                          acc.get(("ldm", smp, steps, best_of, ACCURACY_OF.get(backend, "fp32"))),
                                          base["images_per_sec"], best_of, ddim_eta(smp, args.eta)))
                    _print(results[-1])
    if m.gan:
        gen_flops = flops_per_item(m.gan, torch.randn(2, m.gan.cfg.z_dim),  # a layout generator reads places too
                                   torch.zeros(2, getattr(m.gan.cfg, "cond_dim", 24)))
        for best_of in best_ofs:
            flops = (gen_flops + cls_flops * (best_of > 1)) * best_of + dec_flops
            for backend in cfg["gan_backends"] if best_of == 1 else ["onnxruntime"]:
                batches = sorted(set(cfg["gan_batches"]) | ({1} if backend in cfg["latency_backends"] else set()))
                for batch in batches:
                    cond = conditions_for(batch)
                    with PeakRSS() as mem:
                        secs = timed(gan_runner(m, backend, cond, best_of),
                                     cfg["latency_runs"] if batch == 1 else cfg["runs"])
                    prec = PRECISION.get(backend, "fp32")
                    results.append(record("gan", backend, None, None, batch, secs, flops, peak[prec], mem.peak,
                                          acc.get(("gan", None, None, best_of, ACCURACY_OF.get(backend, "fp32"))),
                                          base["images_per_sec"], best_of))
                    _print(results[-1])
    results.append(dict(model="baseline", backend="torch-fp32", sampler="ddpm", steps=1000, batch=base["batch"],
                        images_per_sec=base["images_per_sec"], flops_per_image=base["flops_per_image"],
                        fraction_of_peak=round(base["flops_per_image"] * base["images_per_sec"] / peak["fp32"], 4),
                        accuracy={}, note="one UNet step timed (median of runs) x 1000; untrained weights"))
    profile = {}
    # where the time goes, on ONNX Runtime fp32 and on each int8 backend timed
    split_backends = ["onnxruntime"] + [b for b in ACCURACY_OF if b in cfg["ldm_backends"] + cfg["gan_backends"]]
    if m.ldm:  # at the first LDM setting and the largest batch
        (sampler, steps), batch = cfg["ldm"][0], max(cfg["ldm_batches"])
        for backend in [b for b in split_backends if b in cfg["ldm_backends"] or b == "onnxruntime"]:
            profile[f"ldm_{backend}"] = split = breakdown(m, sampler, steps, args.guidance, batch, cfg["runs"], backend,
                                                          args.apg_norm, args.class_scale, args.class_iters,
                                                          args.eta)
            sh = split["shares"]
            print(f"LDM time ({backend}, {sampler} {steps} steps, batch {batch}): denoiser {100 * sh['denoiser']:.0f}%, "
                  f"decoder {100 * sh['decoder']:.0f}%, other {100 * sh['other']:.0f}%", flush=True)
        feeds = denoiser_feeds(m, batch, args.guidance)
        profile["denoiser_ops_torch"] = op_profile(m.ldm, *(torch.from_numpy(feeds[k]) for k in ("x", "t", "cond")))
    if m.gan:  # the same for the GAN path, at its largest batch
        for backend in [b for b in split_backends if b in cfg["gan_backends"] or b == "onnxruntime"]:
            profile[f"gan_{backend}"] = split = gan_breakdown(m, max(cfg["gan_batches"]), cfg["runs"], backend)
            sh = split["shares"]
            print(f"GAN time ({backend}, batch {split['batch']}): generator {100 * sh['generator']:.0f}%, decoder "
                  f"{100 * sh['decoder']:.0f}%, other {100 * sh['other']:.0f}%", flush=True)
    profile["decoder_ops_torch"] = op_profile(m.decoder, torch.randn(256, *m.shape))
    for name in ("denoiser_ops_torch", "decoder_ops_torch"):
        if name in profile:
            print(f"{name}: " + ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in profile[name]), flush=True)
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "quick": args.quick, "machine": machine,
           "peak_flops": peak, "guidance": args.guidance, "apg_norm": args.apg_norm,
           "class_scale": args.class_scale, "class_iters": args.class_iters if args.class_scale else 1,
           "eta": args.eta,
           "weights": str(args.weights),
           "baseline": base,
           "decoder_flops_per_image": dec_flops, "results": results, "profile": profile,
           "conditions_limit": cfg["limit"], "fidelity_floors": floors}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    write_reports(out, args.markdown, args.plot)
    return out


def write_reports(out: dict, markdown_path: Path | None, plot_path: Path | None) -> None:
    """The Markdown table and the accuracy-vs-throughput plot of a run's JSON (fresh, or read back by --replot)."""
    if markdown_path:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(markdown(out))
        print(f"wrote {markdown_path}")
    if plot_path:
        m = out["machine"]
        plot(out["results"], plot_path, f"{m['processor']}, {m['threads']} threads, {out['date']}")
        print(f"wrote {plot_path}")


def markdown(out: dict) -> str:
    """The results as a README table."""
    rows = ["| model | backend | sampler | steps | batch | images/s (min-max) | % of peak | x baseline | accuracy test / new_test / heldout (2nd judge) | heldout KID x1000 / precision / unrequested | p50 / p95 ms |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in out["results"]:
        acc = " / ".join(f"{r['accuracy'][f]:.3f}" if f in r["accuracy"] else "-" for f in CONDITION_FILES)
        acc2 = r.get("accuracy_second_judge") or {}
        if acc2:
            acc += " (" + " / ".join(f"{acc2[f]:.3f}" if f in acc2 else "-" for f in CONDITION_FILES) + ")"
        rate = f"{r['images_per_sec']:.4g}" + (f" ({r['images_per_sec_min']:.4g}-{r['images_per_sec_max']:.4g})"
                                               if "images_per_sec_min" in r else "")
        lat = f"{r['latency_ms_p50']} / {r['latency_ms_p95']}" if "latency_ms_p50" in r else ""
        frac = f"{100 * r['fraction_of_peak']:.1f}" if r.get("fraction_of_peak") is not None else ""
        speed = f"{r['speedup_vs_baseline']:,.0f}" if r.get("speedup_vs_baseline") else ""
        smp = ", ".join(x for x in (sampler_label(r), f"best of {r['best_of']}" if r.get("best_of", 1) > 1 else None)
                        if x)
        rows.append(f"| {r['model']} | {r['backend']} | {smp} | {r['steps'] or ''} | {r['batch']} | "
                    f"{rate} | {frac} | {speed} | {acc if r['accuracy'] else ''} | "
                    f"{fidelity_cell((r.get('fidelity') or {}).get('heldout.json'))} | {lat} |")
    for name, floors in (out.get("fidelity_floors") or {}).items():
        if name == "heldout.json":
            rows.append("\nFloors (heldout.json" + (f"[:{out['conditions_limit']}]" if out.get("conditions_limit") else "")
                        + "): " + "; ".join(f"{k.replace('_', ' ')} {fidelity_cell(v)}" for k, v in floors.items()))
    return "\n".join(rows) + "\n"


def sampler_label(r: dict) -> str | None:
    """A row's sampler as the tables show it: DDIM with noise carries its eta ("ddim eta0.5")."""
    return f"{r['sampler']} eta{r['eta']:g}" if r.get("eta") else r["sampler"]


def fidelity_cell(f: dict | None) -> str:
    return f"{f['kid_x1000']:.1f} / {f['precision']:.2f} / {f['unrequested']:.2f}" if f else ""


def _print(r: dict):
    acc = r["accuracy"]
    acc_s = " ".join(f"{k.split('.')[0]}={v:.3f}" for k, v in acc.items()) if acc else "-"
    lat = f" p50 {r['latency_ms_p50']:.1f} ms p95 {r['latency_ms_p95']:.1f} ms" if "latency_ms_p50" in r else ""
    smp = (sampler_label(r) or "-") + (f"x{r['best_of']}" if r.get("best_of", 1) > 1 else "")
    print(f"{r['model']:4} {r['backend']:12} {smp:8} {str(r['steps'] or '-'):>4} b{r['batch']:<4}"
          f"{r['images_per_sec']:9.1f} img/s [{r['images_per_sec_min']:.1f}-{r['images_per_sec_max']:.1f}] "
          f"{100 * (r['fraction_of_peak'] or 0):5.1f}% peak  x{r['speedup_vs_baseline'] or 0:,.0f} baseline  "
          f"acc {acc_s}{lat}", flush=True)


if __name__ == "__main__":
    main()
