"""Load test of runtime.serve on loopback: throughput and latency at several concurrencies, batching on and off.

    python bench/load_test.py [--export exports/default] [--requests 128] [--concurrency 1 8 64] [--json out.json]

Starts the server itself on 127.0.0.1 (a free port), once with dynamic batching and once without, fires
--requests one-image LDM requests (labels from heldout.json, or random 1-3 object sets) at each concurrency,
and reports images/sec and p50/p95/p99 latency. Every response is checked: status 200, one image, and a
sample of responses equal (within 1 grey level) to what the runtime makes for that request alone, which
catches lost or mixed-up responses; the judge scores all images against their own requests. The reference
figure is the runtime's own images/sec at batch 64 (no HTTP), measured in the same run.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from python.core.diffusion import DEFAULT_APG_NORM, DEFAULT_GUIDANCE  # noqa: E402
from python.core.errors import UserError, cli  # noqa: E402
from python.core.labels import OBJECTS, load_conditions  # noqa: E402


def label_sets(n: int, data: Path | None, seed: int = 0) -> list[list[str]]:
    names = list(OBJECTS)
    if data and (data / "heldout.json").exists():
        conds = load_conditions(data / "heldout.json")
        return [[names[j] for j in np.flatnonzero(conds[i % len(conds)])] for i in range(n)]
    rng = np.random.default_rng(seed)
    return [list(rng.choice(names, rng.integers(1, 4), replace=False)) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(export: Path, batching: bool, window_ms: float, threads: int | None):
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "runtime.serve", "--export", str(export), "--port", str(port),
           "--window-ms", str(window_ms), "--max-batch", "256", "--max-queue", "4096"]
    cmd += ["--threads", str(threads)] if threads else []
    cmd += [] if batching else ["--no-batching"]
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise UserError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise UserError("the server did not become ready within 60 s")


async def fire(url: str, bodies: list[dict], concurrency: int, time_limit: float):
    import httpx

    sem = asyncio.Semaphore(concurrency)
    results = [None] * len(bodies)
    t_start = time.perf_counter()

    async def one(client, i):
        async with sem:
            if time.perf_counter() - t_start > time_limit:
                return
            t0 = time.perf_counter()
            try:
                r = await client.post(url + "/generate", json=bodies[i], headers={"accept": "application/json"})
                results[i] = (r.status_code, time.perf_counter() - t0, r.json() if r.status_code == 200 else r.text)
            except httpx.HTTPError as e:
                results[i] = (-1, time.perf_counter() - t0, str(e))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(one(client, i) for i in range(len(bodies))))
    return results, time.perf_counter() - t_start


def decode_png(s: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB"))


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, default=REPO / "exports" / "default")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "iclevr", help="for heldout.json label sets")
    parser.add_argument("--requests", type=int, default=128, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--apg-norm", type=float, default=DEFAULT_APG_NORM,
                        help="adaptive projected guidance's norm cap (0: classifier-free guidance; inf: no cap)")
    parser.add_argument("--window-ms", type=float, default=10.0)
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per run; later requests are skipped")
    parser.add_argument("--check", type=int, default=8, help="responses per run compared with a direct generation")
    parser.add_argument("--threads", type=int, help="server's ONNX Runtime threads")
    parser.add_argument("--modes", nargs="+", default=["batching", "no-batching"], choices=["batching", "no-batching"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.requests < 1 or min(args.concurrency) < 1:
        raise UserError("--requests and --concurrency must be >= 1")

    from python.core.images import to_uint8
    from runtime.generate import Pipeline
    from runtime.judge import judge_scores, topk_hits
    from runtime.models import ExportFolder

    ex = ExportFolder(args.export, threads=args.threads)
    pipe = Pipeline(ex)
    sets = label_sets(args.requests, args.data)
    bodies = [{"labels": s, "n": 1, "steps": args.steps, "guidance": args.guidance, "apg_norm": args.apg_norm, "seed": i}
              for i, s in enumerate(sets)]
    cond = np.zeros((len(sets), len(OBJECTS)), np.float32)
    for i, s in enumerate(sets):
        cond[i, [OBJECTS[x] for x in s]] = 1

    # the runtime's own rate at batch 64, no HTTP: the figure the served throughput is held against
    kw = dict(steps=args.steps, guidance=args.guidance, apg_norm=args.apg_norm)
    pipe.generate(cond[:8], **kw)  # warm-up
    t0 = time.perf_counter()
    ref = pipe.generate(np.resize(cond, (64, cond.shape[1])), batch=64, **kw)
    direct_rate = 64 / (time.perf_counter() - t0)
    del ref
    print(f"runtime alone, batch 64: {direct_rate:.1f} images/s")

    rows = []
    for mode in args.modes:
        proc, url = start_server(args.export, mode == "batching", args.window_ms, args.threads)
        try:
            for conc in args.concurrency:
                results, wall = asyncio.run(fire(url, bodies, conc, args.time_limit))
                done = [(i, r) for i, r in enumerate(results) if r is not None]
                errors = [r for _, r in done if r[0] != 200 or len(r[2]["images"]) != 1]
                ok = [(i, r) for i, r in done if r[0] == 200 and len(r[2]["images"]) == 1]
                lat = np.array([r[1] for _, r in ok]) if ok else np.zeros(1)
                images = np.stack([decode_png(r[2]["images"][0]) for _, r in ok]) if ok else None
                idx = np.array([i for i, _ in ok])
                acc = mismatched = None
                if ok:
                    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
                    if ex.has("judge"):
                        hits, k = topk_hits(judge_scores(ex, x), cond[idx])
                        acc = float(hits.sum() / k.sum())
                    pick = idx[np.linspace(0, len(idx) - 1, min(args.check, len(idx))).astype(int)]
                    mismatched = 0
                    for i in pick:
                        alone = to_uint8(pipe.generate(cond[i:i + 1], seed=i, **kw))[0]
                        got = images[list(idx).index(i)]
                        mismatched += int(np.abs(alone.astype(int) - got.astype(int)).max() > 1)
                row = dict(mode=mode, concurrency=conc, requests=len(bodies), answered=len(ok), errors=len(errors),
                           skipped=len(bodies) - len(done), seconds=round(wall, 2),
                           images_per_sec=round(len(ok) / wall, 2),
                           p50_ms=round(1000 * float(np.percentile(lat, 50)), 1),
                           p95_ms=round(1000 * float(np.percentile(lat, 95)), 1),
                           p99_ms=round(1000 * float(np.percentile(lat, 99)), 1),
                           fraction_of_direct=round(len(ok) / wall / direct_rate, 3),
                           judge_accuracy=acc, checked=min(args.check, len(ok)), mismatched=mismatched)
                rows.append(row)
                print(f"{mode:>11} c={conc:<3} {row['images_per_sec']:7.1f} img/s  p50 {row['p50_ms']:8.1f} ms  "
                      f"p95 {row['p95_ms']:8.1f}  p99 {row['p99_ms']:8.1f}  errors {row['errors']}  "
                      f"skipped {row['skipped']}  mismatched {mismatched}/{row['checked']}  "
                      f"{row['fraction_of_direct']:.0%} of direct", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(), "cpu_count": os.cpu_count(),
           "export": str(args.export), "steps": args.steps, "guidance": args.guidance, "apg_norm": args.apg_norm,
           "window_ms": args.window_ms,
           "direct_batch64_images_per_sec": round(direct_rate, 2), "runs": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
