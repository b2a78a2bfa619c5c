"""HTTP serving with dynamic batching: no torch.

    python -m runtime.serve [--host 127.0.0.1] [--port 8000] [--export exports/default]
    curl -s localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"labels": ["red sphere", "yellow cube"], "n": 4}' > grid.png

POST /generate takes JSON {"labels": [...], "n": 1, "model": "ldm"|"gan", "sampler": "dpmpp", "steps": 20,
"guidance": 5.0, "apg_norm": 5.0, "class_scale": 2.0, "class_iters": 3, "eta": 0.0, "seed": 0, "best_of": 1,
"format": "png"|"json", "scores": false}; all but labels are optional (defaults as shown; "apg_norm": adaptive
projected guidance's norm cap, 0 for classifier-free guidance, python/core/diffusion.py; "class_scale": classifier
guidance on x_0 through the export's class_grad, 0 for none, and 0 by default when the export has no class_grad;
"class_iters": its descent steps per sampler step, 1 to 4, each one more class_grad call; "best_of" N > 1: the best of N
candidates per image by the export's latent classifier, N times the work; python/core/best_of.py). It answers an
8-per-row PNG grid, or (format "json", or Accept: application/json) a JSON list of base64 PNGs, with the judge's
per-image scores when "scores" is true. GET /health, GET /metrics
(Prometheus text format).

Requests that arrive within --window-ms of each other (up to --max-batch images) and share the model and
sampler settings are merged into one sampler call; each keeps its own noise (python/core/noise.py), so its
images do not depend on what it was batched with. Past --max-queue waiting candidate images (n x best_of) or
--max-queue-work waiting image-steps (n x best_of x steps; 1 step for the GAN) the server answers 503 with
Retry-After instead of queueing without bound; a request that could never fit is a 400.

Bounds (each a 400 or 413 with a one-line reason when exceeded): body <= 64 KiB; labels <= 24 (each object once);
n <= --max-n (64); steps <= 1000; best_of <= 16; guidance in [0, 20]; eta in [0, 1]; seed < 2^63; one request's
work n x best_of x steps <= --max-work (16,384 image-steps); every request answered within --timeout seconds (120)
or given a 504, its work cancelled at the next sampler step. Memory: the largest allowed request (64 images, best of
16: 1,024 candidates) holds ~50 MiB of decoded float32 images and ~32 MiB of latents beside the models.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from python.core.diffusion import (
    DEFAULT_APG_NORM,
    DEFAULT_CLASS_ITERS,
    DEFAULT_CLASS_SCALE,
    DEFAULT_GUIDANCE,
    SAMPLERS,
    check_apg_norm,
    check_class_iters,
    check_class_scale,
)
from python.core.errors import UserError, cli
from python.core.images import image_grid, to_uint8
from python.core.labels import OBJECTS
from python.core.memory import keep_freed_memory
from runtime.generate import MAX_BEST_OF, MAX_GUIDANCE, Pipeline
from runtime.judge import judge_scores, topk_hits
from runtime.models import BACKENDS, PRECISIONS, ExportFolder

MODELS = ("ldm", "gan")
FORMATS = ("png", "json")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class BadRequest(Exception):
    """A request the server refuses with 400 and a one-line reason."""


MAX_BODY = 64 * 1024  # bytes; a valid request is well under 1 KiB
MAX_REASON = 300  # characters of an error message (it may quote what the client sent)


@dataclass
class Limits:
    max_n: int = 64
    max_steps: int = 1000
    max_guidance: float = MAX_GUIDANCE  # the command line's bounds (runtime.generate), one place
    max_best_of: int = MAX_BEST_OF
    max_class_iters: int = 4  # classifier guidance's descent steps per sampler step (each ~20% of a step's work)
    max_work: int = 16_384  # image-steps (n x best_of x steps) one request may ask for
    timeout_s: float = 120.0  # a request not answered by then gets a 504 and its work is cancelled
    class_guidance: bool = True  # the export has class_grad (build_app sets it from Pipeline.default_class_scale)
    max_ldm_objects: int | None = None  # a layout denoiser's placement prior holds scenes of up to this many objects
    max_gan_objects: int | None = None  # the same for a layout GAN-path generator


def work(req: dict) -> int:
    """A request's cost in image-steps: candidate images x denoiser steps (the GAN's one pass counts 1)."""
    return req["n"] * req["best_of"] * (req["steps"] if req["model"] == "ldm" else 1)


def clip(text: str, limit: int = MAX_REASON) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def parse_body(raw: bytes, limits: "Limits") -> dict:
    """Bytes -> the validated request (BadRequest otherwise): JSON decoding and validation, linear in the size."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON body ({e})") from None
    except RecursionError:
        raise BadRequest("malformed JSON body (nested too deeply)") from None
    return parse_request(body, limits)


def _get(body: dict, key: str, kind, default):
    value = body.get(key, default)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BadRequest(f"{key!r} must be {names}, got {json.dumps(value)}")
    return value


def parse_request(body, limits: Limits) -> dict:
    """The validated request, or BadRequest naming the field that is wrong and what is valid."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object such as {\"labels\": [\"red sphere\"]}")
    unknown = set(body) - {"labels", "n", "model", "sampler", "steps", "guidance", "apg_norm", "class_scale",
                           "class_iters", "eta", "seed", "best_of", "format", "scores"}
    if unknown:
        raise BadRequest(f"unknown field(s) {sorted(unknown)}")
    if "labels" not in body:
        raise BadRequest("'labels' is required: a list of objects such as [\"red sphere\", \"yellow cube\"]")
    labels = _get(body, "labels", list, None)
    if not labels:
        raise BadRequest("'labels' is empty: give at least one object")
    if len(labels) > len(OBJECTS):
        raise BadRequest(f"'labels' has {len(labels)} entries; a label set names each of the {len(OBJECTS)} objects "
                         f"at most once")
    if not all(isinstance(x, str) for x in labels):
        raise BadRequest("'labels' must be a list of strings")
    bad = [x for x in labels if x not in OBJECTS]
    if bad:
        raise BadRequest(f"unknown label(s) {bad}; valid: {', '.join(OBJECTS)}")
    repeated = sorted(x for x, c in Counter(labels).items() if c > 1)
    if repeated:
        raise BadRequest(f"repeated label(s) {repeated}: a label set names each object once")
    r = dict(labels=labels,
             n=_get(body, "n", int, 1), model=_get(body, "model", str, "ldm"),
             sampler=_get(body, "sampler", str, "dpmpp"), steps=_get(body, "steps", int, 20),
             guidance=float(_get(body, "guidance", (int, float), DEFAULT_GUIDANCE)),
             apg_norm=float(_get(body, "apg_norm", (int, float), DEFAULT_APG_NORM)),
             class_scale=float(_get(body, "class_scale", (int, float),
                                    DEFAULT_CLASS_SCALE if limits.class_guidance else 0.0)),
             class_iters=_get(body, "class_iters", int, DEFAULT_CLASS_ITERS),
             eta=float(_get(body, "eta", (int, float), 0.0)),
             seed=_get(body, "seed", int, 0), best_of=_get(body, "best_of", int, 1), format=_get(body, "format", (str, type(None)), None),
             scores=_get(body, "scores", bool, False))
    if not 1 <= r["n"] <= limits.max_n:
        raise BadRequest(f"'n' must be between 1 and {limits.max_n}, got {r['n']}")
    if r["model"] not in MODELS:
        raise BadRequest(f"'model' must be one of {list(MODELS)}, got {r['model']!r}")
    if r["sampler"] not in SAMPLERS:
        raise BadRequest(f"'sampler' must be one of {list(SAMPLERS)}, got {r['sampler']!r}")
    if not 1 <= r["steps"] <= limits.max_steps:
        raise BadRequest(f"'steps' must be between 1 and {limits.max_steps}, got {r['steps']}")
    if not 0.0 <= r["guidance"] <= limits.max_guidance:
        raise BadRequest(f"'guidance' must be between 0 and {limits.max_guidance}, got {r['guidance']}")
    try:
        check_apg_norm(r["apg_norm"], "'apg_norm'")
        check_class_scale(r["class_scale"], "'class_scale'")
        check_class_iters(r["class_iters"], "'class_iters'")
    except UserError as e:  # the shared check's message, as a 400
        raise BadRequest(str(e)) from None
    most = limits.max_ldm_objects if r["model"] == "ldm" else limits.max_gan_objects
    if most and len(labels) > most:
        raise BadRequest(f"'labels' has {len(labels)} objects; this server's {r['model'].upper()} places at most "
                         f"{most} (its placement prior, python/core/layout.py)")
    if r["class_scale"] > limits.max_guidance:
        raise BadRequest(f"'class_scale' must be between 0 and {limits.max_guidance}, got {r['class_scale']}")
    if r["class_iters"] > limits.max_class_iters:
        raise BadRequest(f"'class_iters' must be between 1 and {limits.max_class_iters}, got {r['class_iters']}")
    if r["class_scale"] and not limits.class_guidance:
        raise BadRequest("'class_scale' > 0 needs classifier guidance, and this server's export has no class_grad "
                         "(export/to_onnx.py with weights/guide); give 0")
    if not 0.0 <= r["eta"] <= 1.0:
        raise BadRequest(f"'eta' must be between 0 and 1, got {r['eta']}")
    if not 0 <= r["seed"] < 2 ** 63:
        raise BadRequest(f"'seed' must be a non-negative 64-bit integer, got {r['seed']}")
    if not 1 <= r["best_of"] <= limits.max_best_of:
        raise BadRequest(f"'best_of' must be between 1 and {limits.max_best_of}, got {r['best_of']}")
    if r["format"] not in (None, *FORMATS):
        raise BadRequest(f"'format' must be one of {list(FORMATS)}, got {r['format']!r}")
    if work(r) > limits.max_work:
        raise BadRequest(f"n x best_of x steps = {work(r)} image-steps, at most {limits.max_work} in one request "
                         f"(ask for fewer images, candidates or steps)")
    return r


def batch_key(r: dict) -> tuple:
    """Requests with equal keys can share one sampler call."""
    if r["model"] == "gan":
        return ("gan", r["best_of"])
    return ("ldm", r["sampler"], r["steps"], r["guidance"], r["apg_norm"], r["class_scale"],
            r["class_iters"] if r["class_scale"] else 1, r["eta"], r["best_of"])


def condition(req: dict) -> np.ndarray:
    """The request's multi-hot condition, one row per image."""
    cond = np.zeros((req["n"], len(OBJECTS)), np.float32)
    cond[:, [OBJECTS[x] for x in req["labels"]]] = 1.0
    return cond


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float):
        self.sum, self.n = self.sum + v, self.n + 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def prometheus(self, name: str, help_: str) -> list[str]:
        lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        lines += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return lines + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.n}"]


class Cancelled(Exception):
    """Every request of a running batch has given up (deadline passed, client gone): its work stops."""


@dataclass
class Job:
    req: dict
    cond: np.ndarray  # (n, 24)
    future: asyncio.Future
    t0: float = field(default_factory=time.perf_counter)

    @property
    def abandoned(self) -> bool:
        return self.future.done()  # answered, cancelled by its handler (deadline, disconnect) or failed


class Batcher:
    """Queues validated requests and runs them in merged batches on one worker thread (ONNX Runtime uses
    all cores for one call; two calls at once would only contend)."""

    def __init__(self, pipe: Pipeline, window_ms: float = 10.0, max_batch: int = 256, max_queue: int = 1024,
                 batching: bool = True, max_queue_work: int = 65_536):
        self.pipe, self.window, self.max_batch, self.max_queue = pipe, window_ms / 1000, max_batch, max_queue
        self.max_queue_work = max_queue_work
        self.batching = batching
        self.pending: deque[Job] = deque()
        self.queued_images = 0  # candidate images (n x best_of) waiting
        self.queued_work = 0  # image-steps waiting
        self.wake = asyncio.Event()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="sampler")
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.cancelled = 0  # sampler calls stopped because every request in them had given up
        self.task: asyncio.Task | None = None

    def submit(self, req: dict) -> asyncio.Future:
        """The request's future; BadRequest when it could never fit the queue, OverflowError when it does not now."""
        images = req["n"] * req["best_of"]
        if images > self.max_queue or work(req) > self.max_queue_work:
            raise BadRequest(f"n x best_of = {images} candidate images and {work(req)} image-steps; this server "
                             f"queues at most {self.max_queue} and {self.max_queue_work}")
        if self.queued_images + images > self.max_queue or self.queued_work + work(req) > self.max_queue_work:
            raise OverflowError
        job = Job(req, condition(req), asyncio.get_running_loop().create_future())
        self.pending.append(job)
        self.queued_images += images
        self.queued_work += work(req)
        self.wake.set()
        return job.future

    def _dequeue(self, job: Job) -> None:
        self.queued_images -= job.req["n"] * job.req["best_of"]
        self.queued_work -= work(job.req)

    def _take(self) -> list[Job]:
        """The first waiting job and every later one that fits its batch (same key, up to max_batch images); jobs
        whose requests gave up while waiting are dropped. Empty when all had."""
        while self.pending and self.pending[0].abandoned:
            self._dequeue(self.pending.popleft())
        if not self.pending:
            return []
        first = self.pending.popleft()
        self._dequeue(first)
        batch, size, key = [first], first.req["n"], batch_key(first.req)
        if self.batching:
            for job in list(self.pending):
                if job.abandoned:
                    self.pending.remove(job)
                    self._dequeue(job)
                elif batch_key(job.req) == key and size + job.req["n"] <= self.max_batch:
                    self.pending.remove(job)
                    self._dequeue(job)
                    batch.append(job)
                    size += job.req["n"]
        return batch

    def _run(self, jobs: list[Job]) -> np.ndarray:
        r = jobs[0].req
        cond = np.concatenate([j.cond for j in jobs])
        seeds = [(j.req["seed"], j.req["n"]) for j in jobs]
        if r["model"] == "gan":
            return self.pipe.generate(cond, "gan", r["best_of"], seeds=seeds)

        def on_step(*_):  # between sampler steps: stop when no one waits for the result any more
            if all(j.abandoned for j in jobs):
                raise Cancelled
        return self.pipe.generate(cond, "ldm", r["best_of"], sampler=r["sampler"], steps=r["steps"], guidance=r["guidance"],
                                  apg_norm=r["apg_norm"], class_scale=r["class_scale"], class_iters=r["class_iters"],
                                  eta=r["eta"], seeds=seeds,
                                  batch=self.max_batch, on_step=on_step)

    async def run_forever(self):
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self.wake.clear()
                await self.wake.wait()
            if self.batching and self.window > 0:
                # let concurrent requests arrive, but stop waiting once a full batch is there
                deadline = loop.time() + self.window
                while loop.time() < deadline and self.queued_images < self.max_batch:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), deadline - loop.time())
                    except asyncio.TimeoutError:
                        break
            jobs = self._take()
            if not jobs:
                continue
            self.batch_sizes.observe(sum(j.req["n"] for j in jobs))
            try:
                images = await loop.run_in_executor(self.pool, self._run, jobs)
            except Cancelled:
                self.cancelled += 1
                continue
            except Exception as e:  # a failure of one batch fails its requests, not the server
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            start = 0
            for j in jobs:
                if not j.future.done():  # the client may have gone away
                    j.future.set_result(images[start:start + j.req["n"]])
                start += j.req["n"]

    async def drain(self):
        """Wait until every queued request has been answered (graceful shutdown)."""
        while self.pending:
            await asyncio.sleep(0.01)


def png_bytes(image_u8: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_u8).save(buf, format="PNG")
    return buf.getvalue()


def judge_report(pipe: Pipeline, images: np.ndarray, cond: np.ndarray) -> list[dict]:
    logits = judge_scores(pipe.ex, images)
    hits, k = topk_hits(logits, cond)
    probs = 1 / (1 + np.exp(-logits))
    top = np.argsort(-logits, axis=1, kind="stable")
    return [{"hits": int(h), "k": int(kk), "accuracy": float(h / kk),
             "top": [pipe.ex.labels[c] for c in top[i, :kk]],
             "probabilities": {pipe.ex.labels[c]: round(float(probs[i, c]), 4) for c in np.flatnonzero(cond[i])}}
            for i, (h, kk) in enumerate(zip(hits, k))]


def warm_up(pipe: Pipeline, models: list[str]) -> dict:
    """Run each model of the export once (one image; the LDM one step; the judge and the classifier where there
    are), so that a model that does not load or run stops the server at start, not every request later.
    {part: milliseconds}."""
    cond = np.zeros((1, len(OBJECTS)), np.float32)
    cond[0, 0] = 1.0
    times = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        try:
            out = fn()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of a model at start is the export's fault
            raise UserError(f"{pipe.ex.path}: the {name} does not run ({type(e).__name__}: "
                            f"{clip(str(e).splitlines()[0] if str(e) else '', 200)}); re-export it") from None
        times[name] = round(1000 * (time.perf_counter() - t0), 1)
        return out

    images = None
    if "gan" in models:
        images = timed("gan", lambda: pipe.generate(cond, "gan"))
    if "ldm" in models:
        images = timed("ldm", lambda: pipe.generate(cond, "ldm", steps=1, class_scale=pipe.default_class_scale))
    if images is not None and pipe.ex.has("judge"):
        timed("judge", lambda: judge_scores(pipe.ex, images))
    if images is not None and pipe.ex.has("classifier"):
        timed("classifier", lambda: pipe.classifier_logits(np.zeros((1, *pipe.latent_shape), np.float32)))
    return times


def build_app(export: Path | None = None, window_ms: float = 10.0, max_batch: int = 256, max_queue: int = 1024,
              batching: bool = True, limits: Limits | None = None, threads: int | None = None,
              providers: list[str] | None = None, precision: str = "fp32", backend: str = "onnxruntime",
              max_queue_work: int = 65_536):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    pipe = Pipeline(ExportFolder(export, providers, threads, precision, backend))
    bank = pipe.ex.layout_bank if pipe.ex.has("denoiser") else None
    gen_bank = pipe.ex.generator_layout_bank if pipe.ex.has("generator") else None
    limits = replace(limits or Limits(), class_guidance=pipe.default_class_scale > 0,
                     max_ldm_objects=bank.max_objects if bank is not None else None,
                     max_gan_objects=gen_bank.max_objects if gen_bank is not None else None)
    batcher = Batcher(pipe, window_ms, max_batch, max_queue, batching, max_queue_work)
    available = [m for m, part in (("ldm", "denoiser"), ("gan", "generator")) if pipe.ex.has(part)]
    warm = warm_up(pipe, available)
    stats = {"requests": {}, "images": 0, "latency": Histogram(LATENCY_BUCKETS)}

    def count(code: int):
        stats["requests"][code] = stats["requests"].get(code, 0) + 1

    def fail(code: int, reason: str, **headers) -> JSONResponse:
        count(code)
        return JSONResponse({"error": clip(reason)}, code, headers=headers or None)

    async def read_body(request: Request) -> bytes | None:
        """The body, or None when it is larger than MAX_BODY (read no further than that)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def generate(request: Request):
        t0 = time.perf_counter()
        raw = await read_body(request)
        if raw is None:
            return fail(413, f"request body larger than {MAX_BODY} bytes; a request is a small JSON object such as "
                             f"{{\"labels\": [\"red sphere\"], \"n\": 4}}")
        try:  # decoding and validation off the event loop: a large body does not stall other requests
            req = await asyncio.to_thread(parse_body, raw, limits)
        except BadRequest as e:
            return fail(400, str(e))
        if req["model"] not in available:
            return fail(400, f"model {req['model']!r} is not in this export; it serves {available}")
        if req["best_of"] > 1 and not pipe.ex.has("classifier"):
            return fail(400, "'best_of' > 1 needs the latent classifier, which this export does not have")
        try:
            future = batcher.submit(req)
        except BadRequest as e:
            return fail(400, str(e))
        except OverflowError:
            return fail(503, f"overloaded: {batcher.queued_images} candidate images / {batcher.queued_work} "
                             f"image-steps queued (limits {max_queue} / {max_queue_work}); retry later",
                        **{"Retry-After": "1"})
        try:
            # the deadline counts from arrival; on it (or a client gone) the future is cancelled, which drops the job
            # from the queue or stops its sampler call at the next step when no other request shares it
            images = await asyncio.wait_for(future, max(limits.timeout_s - (time.perf_counter() - t0), 0.001))
        except asyncio.TimeoutError:
            return fail(504, f"not answered within {limits.timeout_s:g} s (queue and sampling); ask for fewer images "
                             f"or steps, or retry when the server is less busy")
        except (UserError, ValueError) as e:
            return fail(400, str(e))
        except Exception as e:  # noqa: BLE001 - reported to the client as a 500 with its reason
            return fail(500, f"generation failed: {type(e).__name__}: {e}")
        fmt = req["format"] or ("json" if "application/json" in request.headers.get("accept", "") or req["scores"]
                                else "png")
        u8 = to_uint8(images)
        if fmt == "png":
            response = Response(png_bytes(image_grid(images)), media_type="image/png",
                                headers={"X-Images": str(len(images))})
        else:
            payload = {"labels": req["labels"], "n": req["n"], "model": req["model"], "seed": req["seed"],
                       "images": [base64.b64encode(png_bytes(im)).decode() for im in u8]}
            if req["scores"]:
                if not pipe.ex.has("judge"):
                    return fail(400, "this export has no judge, so 'scores' cannot be given")
                payload["scores"] = judge_report(pipe, images, condition(req))
            response = JSONResponse(payload)
        count(200)
        stats["images"] += len(images)
        stats["latency"].observe(time.perf_counter() - t0)
        return response

    async def health(request: Request):
        return JSONResponse({"status": "ok", "models": available, "judge": pipe.ex.has("judge"),
                             "warm_up_ms": warm, "backend": backend, "precision": precision,
                             "class_guidance": limits.class_guidance, "queued_images": batcher.queued_images,
                             "queued_work": batcher.queued_work,
                             "batching": batching, "window_ms": window_ms, "max_batch": max_batch,
                             "limits": {"max_n": limits.max_n, "max_steps": limits.max_steps,
                                        "max_best_of": limits.max_best_of, "max_work": limits.max_work,
                                        "timeout_s": limits.timeout_s, "max_body_bytes": MAX_BODY,
                                        "max_queue": max_queue, "max_queue_work": max_queue_work}})

    async def metrics(request: Request):
        lines = ["# HELP iclevr_requests_total Requests answered, by HTTP status.",
                 "# TYPE iclevr_requests_total counter"]
        lines += [f'iclevr_requests_total{{code="{c}"}} {n}' for c, n in sorted(stats["requests"].items())]
        lines += ["# HELP iclevr_images_total Images generated and returned.", "# TYPE iclevr_images_total counter",
                  f"iclevr_images_total {stats['images']}",
                  "# HELP iclevr_queue_images Images waiting for the sampler.", "# TYPE iclevr_queue_images gauge",
                  f"iclevr_queue_images {batcher.queued_images}",
                  "# HELP iclevr_queue_work Image-steps waiting for the sampler.", "# TYPE iclevr_queue_work gauge",
                  f"iclevr_queue_work {batcher.queued_work}",
                  "# HELP iclevr_cancelled_total Sampler calls stopped because their requests had given up.",
                  "# TYPE iclevr_cancelled_total counter", f"iclevr_cancelled_total {batcher.cancelled}"]
        lines += stats["latency"].prometheus("iclevr_request_seconds", "Latency of answered /generate requests.")
        lines += batcher.batch_sizes.prometheus("iclevr_batch_images", "Images per sampler call.")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.task = asyncio.create_task(batcher.run_forever())
        yield
        await batcher.drain()
        batcher.task.cancel()
        batcher.pool.shutdown(wait=True)

    app = Starlette(routes=[Route("/generate", generate, methods=["POST"]), Route("/health", health),
                            Route("/metrics", metrics)], lifespan=lifespan)
    app.state.batcher, app.state.pipeline = batcher, pipe
    return app


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--export", type=Path, help="export folder (default exports/default)")
    parser.add_argument("--window-ms", type=float, default=10.0, help="how long the batcher waits for more requests")
    parser.add_argument("--max-batch", type=int, default=256, help="most images in one sampler call")
    parser.add_argument("--max-queue", type=int, default=1024,
                        help="most candidate images (n x best_of) waiting; beyond it, 503")
    parser.add_argument("--max-queue-work", type=int, default=65_536,
                        help="most image-steps (n x best_of x steps) waiting; beyond it, 503")
    parser.add_argument("--max-n", type=int, default=64, help="most images one request may ask for")
    parser.add_argument("--max-work", type=int, default=16_384,
                        help="most image-steps (n x best_of x steps) one request may ask for")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a request may take, queue included; then 504 and its work is cancelled")
    parser.add_argument("--no-batching", action="store_true", help="run each request alone (for comparison)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--providers", nargs="+", help="ONNX Runtime execution providers, in order")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="the export's fp16 or int8 copies where it has them (export/to_onnx.py --fp16 / --int8)")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                        help="the engine that runs the export's graphs: onnxruntime (CPU or GPU providers) or openvino "
                             "(CPU; int8 from its NNCF copies, export/to_onnx.py --int8 with openvino and nncf installed)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # batched inference: see python/core/memory.py
    if not (args.window_ms >= 0 and min(args.max_batch, args.max_queue, args.max_queue_work, args.max_n,
                                        args.max_work) >= 1 and args.timeout > 0):
        raise UserError("--window-ms must be >= 0, --timeout > 0 and --max-batch, --max-queue, --max-queue-work, "
                        "--max-n, --max-work >= 1")
    import uvicorn

    limits = Limits(max_n=args.max_n, max_work=args.max_work, timeout_s=args.timeout)
    app = build_app(args.export, args.window_ms, args.max_batch, args.max_queue, not args.no_batching, limits,
                    args.threads, args.providers, args.precision, args.backend, args.max_queue_work)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
