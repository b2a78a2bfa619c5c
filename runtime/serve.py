"""HTTP serving with dynamic batching: no torch.

    python -m runtime.serve [--host 127.0.0.1] [--port 8000] [--export exports/default]
    curl -s localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"labels": ["red sphere", "yellow cube"], "n": 4}' > grid.png

POST /generate takes JSON {"labels": [...], "n": 1, "model": "ldm"|"gan", "sampler": "dpmpp", "steps": 20,
"guidance": 4.0, "eta": 0.0, "seed": 0, "best_of": 1, "format": "png"|"json", "scores": false}; all but labels
are optional ("best_of" N > 1: the best of N candidates per image by the export's latent classifier, N times the
work; python/core/best_of.py). It answers an 8-per-row PNG grid, or (format "json", or Accept: application/json) a JSON list of
base64 PNGs, with the judge's per-image scores when "scores" is true. GET /health, GET /metrics
(Prometheus text format).

Requests that arrive within --window-ms of each other (up to --max-batch images) and share the model and
sampler settings are merged into one sampler call; each keeps its own noise (python/core/noise.py), so its
images do not depend on what it was batched with. Past --max-queue waiting images the server answers 503
with Retry-After instead of queueing without bound.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from python.core.diffusion import DEFAULT_GUIDANCE, SAMPLERS
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


@dataclass
class Limits:
    max_n: int = 64
    max_steps: int = 1000
    max_guidance: float = MAX_GUIDANCE  # the command line's bounds (runtime.generate), one place
    max_best_of: int = MAX_BEST_OF


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
    unknown = set(body) - {"labels", "n", "model", "sampler", "steps", "guidance", "eta", "seed", "best_of",
                           "format", "scores"}
    if unknown:
        raise BadRequest(f"unknown field(s) {sorted(unknown)}")
    if "labels" not in body:
        raise BadRequest("'labels' is required: a list of objects such as [\"red sphere\", \"yellow cube\"]")
    labels = _get(body, "labels", list, None)
    if not labels:
        raise BadRequest("'labels' is empty: give at least one object")
    if not all(isinstance(x, str) for x in labels):
        raise BadRequest("'labels' must be a list of strings")
    bad = [x for x in labels if x not in OBJECTS]
    if bad:
        raise BadRequest(f"unknown label(s) {bad}; valid: {', '.join(OBJECTS)}")
    if len(set(labels)) != len(labels):
        raise BadRequest(f"repeated label(s) {sorted({x for x in labels if labels.count(x) > 1})}: "
                         f"a label set names each object once")
    r = dict(labels=labels,
             n=_get(body, "n", int, 1), model=_get(body, "model", str, "ldm"),
             sampler=_get(body, "sampler", str, "dpmpp"), steps=_get(body, "steps", int, 20),
             guidance=float(_get(body, "guidance", (int, float), DEFAULT_GUIDANCE)), eta=float(_get(body, "eta", (int, float), 0.0)),
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
    if not 0.0 <= r["eta"] <= 1.0:
        raise BadRequest(f"'eta' must be between 0 and 1, got {r['eta']}")
    if not 0 <= r["seed"] < 2 ** 63:
        raise BadRequest(f"'seed' must be a non-negative 64-bit integer, got {r['seed']}")
    if not 1 <= r["best_of"] <= limits.max_best_of:
        raise BadRequest(f"'best_of' must be between 1 and {limits.max_best_of}, got {r['best_of']}")
    if r["format"] not in (None, *FORMATS):
        raise BadRequest(f"'format' must be one of {list(FORMATS)}, got {r['format']!r}")
    return r


def batch_key(r: dict) -> tuple:
    """Requests with equal keys can share one sampler call."""
    if r["model"] == "gan":
        return ("gan", r["best_of"])
    return ("ldm", r["sampler"], r["steps"], r["guidance"], r["eta"], r["best_of"])


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


@dataclass
class Job:
    req: dict
    cond: np.ndarray  # (n, 24)
    future: asyncio.Future
    t0: float = field(default_factory=time.perf_counter)


class Batcher:
    """Queues validated requests and runs them in merged batches on one worker thread (ONNX Runtime uses
    all cores for one call; two calls at once would only contend)."""

    def __init__(self, pipe: Pipeline, window_ms: float = 10.0, max_batch: int = 256, max_queue: int = 1024,
                 batching: bool = True):
        self.pipe, self.window, self.max_batch, self.max_queue = pipe, window_ms / 1000, max_batch, max_queue
        self.batching = batching
        self.pending: deque[Job] = deque()
        self.queued_images = 0
        self.wake = asyncio.Event()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="sampler")
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.task: asyncio.Task | None = None

    def submit(self, req: dict) -> asyncio.Future:
        if self.queued_images + req["n"] > self.max_queue:
            raise OverflowError
        job = Job(req, condition(req), asyncio.get_running_loop().create_future())
        self.pending.append(job)
        self.queued_images += req["n"]
        self.wake.set()
        return job.future

    def _take(self) -> list[Job]:
        """The first waiting job and every later one that fits its batch (same key, up to max_batch images)."""
        first = self.pending.popleft()
        batch, size, key = [first], first.req["n"], batch_key(first.req)
        if self.batching:
            for job in list(self.pending):
                if batch_key(job.req) == key and size + job.req["n"] <= self.max_batch:
                    self.pending.remove(job)
                    batch.append(job)
                    size += job.req["n"]
        self.queued_images -= size
        return batch

    def _run(self, jobs: list[Job]) -> np.ndarray:
        r = jobs[0].req
        cond = np.concatenate([j.cond for j in jobs])
        seeds = [(j.req["seed"], j.req["n"]) for j in jobs]
        if r["model"] == "gan":
            return self.pipe.generate(cond, "gan", r["best_of"], seeds=seeds)
        return self.pipe.generate(cond, "ldm", r["best_of"], sampler=r["sampler"], steps=r["steps"], guidance=r["guidance"],
                                  eta=r["eta"], seeds=seeds, batch=self.max_batch)

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
            self.batch_sizes.observe(sum(j.req["n"] for j in jobs))
            try:
                images = await loop.run_in_executor(self.pool, self._run, jobs)
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


def build_app(export: Path | None = None, window_ms: float = 10.0, max_batch: int = 256, max_queue: int = 1024,
              batching: bool = True, limits: Limits | None = None, threads: int | None = None,
              providers: list[str] | None = None, precision: str = "fp32", backend: str = "onnxruntime"):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    limits = limits or Limits()
    pipe = Pipeline(ExportFolder(export, providers, threads, precision, backend))
    batcher = Batcher(pipe, window_ms, max_batch, max_queue, batching)
    available = [m for m, part in (("ldm", "denoiser"), ("gan", "generator")) if pipe.ex.has(part)]
    stats = {"requests": {}, "images": 0, "latency": Histogram(LATENCY_BUCKETS)}

    def count(code: int):
        stats["requests"][code] = stats["requests"].get(code, 0) + 1

    def fail(code: int, reason: str, **headers) -> JSONResponse:
        count(code)
        return JSONResponse({"error": reason}, code, headers=headers or None)

    async def generate(request: Request):
        t0 = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return fail(400, f"malformed JSON body ({e})")
        try:
            req = parse_request(body, limits)
        except BadRequest as e:
            return fail(400, str(e))
        if req["model"] not in available:
            return fail(400, f"model {req['model']!r} is not in this export; it serves {available}")
        if req["best_of"] > 1 and not pipe.ex.has("classifier"):
            return fail(400, "'best_of' > 1 needs the latent classifier, which this export does not have")
        try:
            future = batcher.submit(req)
        except OverflowError:
            return fail(503, f"overloaded: {batcher.queued_images} images queued (limit {max_queue}); retry later",
                        **{"Retry-After": "1"})
        try:
            images = await future
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
                             "queued_images": batcher.queued_images, "batching": batching,
                             "window_ms": window_ms, "max_batch": max_batch})

    async def metrics(request: Request):
        lines = ["# HELP iclevr_requests_total Requests answered, by HTTP status.",
                 "# TYPE iclevr_requests_total counter"]
        lines += [f'iclevr_requests_total{{code="{c}"}} {n}' for c, n in sorted(stats["requests"].items())]
        lines += ["# HELP iclevr_images_total Images generated and returned.", "# TYPE iclevr_images_total counter",
                  f"iclevr_images_total {stats['images']}",
                  "# HELP iclevr_queue_images Images waiting for the sampler.", "# TYPE iclevr_queue_images gauge",
                  f"iclevr_queue_images {batcher.queued_images}"]
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
    parser.add_argument("--max-queue", type=int, default=1024, help="most images waiting; beyond it, 503")
    parser.add_argument("--max-n", type=int, default=64, help="most images one request may ask for")
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
    if args.window_ms < 0 or args.max_batch < 1 or args.max_queue < 1 or args.max_n < 1:
        raise UserError("--window-ms must be >= 0 and --max-batch, --max-queue, --max-n >= 1")
    import uvicorn

    app = build_app(args.export, args.window_ms, args.max_batch, args.max_queue, not args.no_batching, Limits(max_n=args.max_n),
                    args.threads, args.providers, args.precision, args.backend)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
