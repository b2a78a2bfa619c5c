import asyncio
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from python.core.images import to_uint8
from runtime.generate import Pipeline
from runtime.models import ExportFolder
from runtime.serve import Batcher, Limits, batch_key, build_app, condition, parse_request


@pytest.fixture(scope="module")
def client(onnx_export):
    with TestClient(build_app(onnx_export, window_ms=5, max_batch=64, max_queue=64, threads=2)) as c:
        yield c


def _decode_pngs(payload):
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in payload["images"]])


def test_generate_png_grid(client):
    r = client.post("/generate", json={"labels": ["red sphere", "yellow cube"], "n": 3, "steps": 4})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (3 * 64 + 4 * 2, 64 + 2 * 2)  # one row of 3, 2-px borders


def test_generate_json_with_scores_matches_the_pipeline(client, onnx_export):
    body = {"labels": ["gray cube"], "n": 2, "steps": 4, "seed": 11, "scores": True}
    r = client.post("/generate", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    payload = r.json()
    got = _decode_pngs(payload)
    assert got.shape == (2, 64, 64, 3)
    req = parse_request(body, Limits())
    ref = Pipeline(ExportFolder(onnx_export, threads=2)).generate(condition(req), "ldm", steps=4, seeds=[(11, 2)])
    assert np.abs(got.astype(int) - to_uint8(ref).astype(int)).max() <= 1
    assert [s["k"] for s in payload["scores"]] == [1, 1]
    assert all(set(s["probabilities"]) == {"gray cube"} and 0 <= s["hits"] <= 1 for s in payload["scores"])


def test_projected_guidance_request_matches_the_pipeline_and_is_not_batched_with_plain_guidance(client, onnx_export):
    body = {"labels": ["gray cube", "red sphere"], "n": 2, "steps": 4, "seed": 11, "guidance": 20, "apg_norm": 0.01,
            "format": "json"}
    got = _decode_pngs(client.post("/generate", json=body).json())
    req = parse_request(body, Limits())
    pipe = Pipeline(ExportFolder(onnx_export, threads=2))
    ref = pipe.generate(condition(req), "ldm", steps=4, guidance=20, seeds=[(11, 2)], apg_norm=0.01)
    plain = pipe.generate(condition(req), "ldm", steps=4, guidance=20, seeds=[(11, 2)])
    assert np.abs(got.astype(int) - to_uint8(ref).astype(int)).max() <= 1
    assert np.abs(got.astype(int) - to_uint8(plain).astype(int)).max() > 1
    assert batch_key(req) != batch_key(parse_request({**body, "apg_norm": 0}, Limits()))


def test_best_of_request_matches_the_pipeline(client, onnx_export):
    body = {"labels": ["red sphere", "cyan cube"], "n": 2, "steps": 3, "seed": 4, "best_of": 3, "format": "json"}
    r = client.post("/generate", json=body)
    assert r.status_code == 200
    ref = Pipeline(ExportFolder(onnx_export, threads=2)).generate(condition(parse_request(body, Limits())), "ldm", 3,
                                                                  steps=3, seeds=[(4, 2)])
    assert np.abs(_decode_pngs(r.json()).astype(int) - to_uint8(ref).astype(int)).max() <= 1
    r = client.post("/generate", json={**body, "best_of": 17})
    assert r.status_code == 400 and "'best_of' must be between 1 and 16" in r.json()["error"]


def test_accept_header_selects_json_and_gan_works(client):
    r = client.post("/generate", json={"labels": ["blue cylinder"], "model": "gan", "n": 2},
                    headers={"accept": "application/json"})
    assert r.status_code == 200 and len(r.json()["images"]) == 2


@pytest.mark.parametrize("body, words", [
    ({"labels": ["red sphere", "pink cube"]}, ["pink cube", "valid", "gray cube"]),
    ({"labels": []}, ["empty"]),
    ({"labels": ["red sphere", "red sphere"]}, ["repeated", "red sphere"]),
    ({"n": 2}, ["labels", "required"]),
    ({"labels": ["red sphere"], "n": 65}, ["'n'", "64"]),
    ({"labels": ["red sphere"], "n": "4"}, ["'n'", "int"]),
    ({"labels": ["red sphere"], "n": True}, ["'n'", "int"]),
    ({"labels": "red sphere"}, ["'labels'", "list"]),
    ({"labels": ["red sphere"], "model": "vae"}, ["'model'", "ldm"]),
    ({"labels": ["red sphere"], "sampler": "euler"}, ["'sampler'", "dpmpp"]),
    ({"labels": ["red sphere"], "steps": 0}, ["'steps'"]),
    ({"labels": ["red sphere"], "guidance": -1}, ["'guidance'"]),
    ({"labels": ["red sphere"], "apg_norm": -1}, ["'apg_norm'", "positive norm cap"]),
    ({"labels": ["red sphere"], "colour": "red"}, ["unknown field", "colour"]),
    ([1, 2], ["JSON object"]),
])
def test_bad_input_is_a_400_with_a_reason_and_the_server_keeps_serving(client, body, words):
    r = client.post("/generate", json=body)
    assert r.status_code == 400
    reason = r.json()["error"]
    assert "\n" not in reason and all(w in reason for w in words), reason
    assert client.get("/health").json()["status"] == "ok"


def test_malformed_json_is_a_400(client):
    r = client.post("/generate", content=b'{"labels": ["red sphere"', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]


def test_metrics_are_prometheus_text(client):
    client.post("/generate", json={"labels": ["red sphere"], "steps": 2})
    text = client.get("/metrics").text
    assert 'iclevr_requests_total{code="200"}' in text and 'iclevr_requests_total{code="400"}' in text
    assert "# TYPE iclevr_request_seconds histogram" in text and "iclevr_batch_images_count" in text
    assert "iclevr_queue_images 0" in text


def test_batching_merges_concurrent_requests_and_splits_them_back(onnx_export):
    pipe = Pipeline(ExportFolder(onnx_export, threads=2))
    reqs = [parse_request({"labels": ["red sphere"], "n": 2, "steps": 3, "seed": 5}, Limits()),
            parse_request({"labels": ["cyan cube", "gray cylinder"], "n": 3, "steps": 3, "seed": 9}, Limits()),
            parse_request({"labels": ["cyan cube"], "n": 1, "steps": 5, "seed": 9}, Limits())]  # other steps

    async def go():
        b = Batcher(pipe, window_ms=50, max_batch=64)
        task = asyncio.create_task(b.run_forever())
        futures = [b.submit(r) for r in reqs]
        out = await asyncio.gather(*futures)
        task.cancel()
        return out, b

    out, b = asyncio.run(go())
    assert b.batch_sizes.n == 2 and b.batch_sizes.sum == 6  # the two 3-step requests merged: 5 images, then 1
    for r, images in zip(reqs, out):
        alone = pipe.generate(condition(r), "ldm", steps=r["steps"], seeds=[(r["seed"], r["n"])])
        assert images.shape == alone.shape
        np.testing.assert_allclose(images, alone, atol=1e-4)  # same images whatever the batch-mates
    assert np.abs(out[0][:1] - out[1][:1]).max() > 1e-3  # and different requests differ


def test_overload_answers_503_with_retry_after_and_a_request_that_can_never_fit_400(onnx_export):
    with TestClient(build_app(onnx_export, max_queue=4, threads=2, max_queue_work=100)) as c:
        r = c.post("/generate", json={"labels": ["red sphere"], "n": 5})  # more than the whole queue: never fits
        assert r.status_code == 400 and "queues at most 4" in r.json()["error"]
        r = c.post("/generate", json={"labels": ["red sphere"], "n": 2, "best_of": 3})  # 6 candidates, not 2
        assert r.status_code == 400 and "6 candidate images" in r.json()["error"]
        r = c.post("/generate", json={"labels": ["red sphere"], "n": 2, "steps": 60})  # 120 image-steps > 100
        assert r.status_code == 400 and "120 image-steps" in r.json()["error"]
        assert c.post("/generate", json={"labels": ["red sphere"], "n": 2, "steps": 2}).status_code == 200

    async def full_queue():  # the queue counts work: two requests of 3 x 10 image-steps fill a queue of 50
        b = Batcher(Pipeline(ExportFolder(onnx_export, threads=2)), max_queue=64, max_queue_work=50)
        req = parse_request({"labels": ["red sphere"], "n": 3, "steps": 10}, Limits())
        b.submit(req)
        with pytest.raises(OverflowError):
            b.submit(req)
        assert (b.queued_images, b.queued_work) == (3, 30)
    asyncio.run(full_queue())
    with TestClient(build_app(onnx_export, max_queue=4, threads=2)) as c:  # a full queue over HTTP: 503
        c.app.state.batcher.queued_images = 4  # as if four images were waiting
        r = c.post("/generate", json={"labels": ["red sphere"], "n": 1, "steps": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "overloaded" in r.json()["error"]
        c.app.state.batcher.queued_images = 0


HOSTILE = {
    "700 KB of labels": (b'{"labels": [' + b'"red sphere", ' * 50_000 + b'"red sphere"]}', 413, ["larger than 65536 bytes"]),
    "nested 30,000 deep": (b"[" * 30_000 + b"]" * 30_000, 400, ["nested too deeply"]),
    "a 20 KB label": (json.dumps({"labels": ["x" * 20_000]}).encode(), 400, ["unknown label", "more characters"]),
    "30 labels": (json.dumps({"labels": ["red sphere"] * 30}).encode(), 400, ["30 entries", "at most once"]),
    "16 x best of 16 x 1000 steps": (json.dumps({"labels": ["red sphere"], "n": 16, "best_of": 16, "steps": 1000}).encode(),
                                     400, ["256000 image-steps", "at most 16384"]),
    "not UTF-8": (b"\xff\xfe{}", 400, ["malformed JSON"]),
}


@pytest.mark.parametrize("raw, code, words", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_bodies_are_refused_quickly_with_a_short_reason(client, raw, code, words):
    import time

    t0 = time.perf_counter()
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == code and time.perf_counter() - t0 < 5
    reason = r.json()["error"]
    assert all(w in reason for w in words) and len(reason) < 500, reason
    assert client.get("/health").json()["status"] == "ok"


def test_a_request_past_its_deadline_gets_504_and_its_sampling_is_cancelled(onnx_export):
    import time

    with TestClient(build_app(onnx_export, threads=2, limits=Limits(timeout_s=0.3))) as c:
        t0 = time.perf_counter()
        r = c.post("/generate", json={"labels": ["red sphere"], "n": 16, "steps": 1000, "sampler": "ddim"})
        assert r.status_code == 504 and "not answered within 0.3 s" in r.json()["error"]
        assert time.perf_counter() - t0 < 5
        for _ in range(200):  # the sampler thread stops at its next step
            if "iclevr_cancelled_total 1" in c.get("/metrics").text:
                break
            time.sleep(0.05)
        assert "iclevr_cancelled_total 1" in c.get("/metrics").text
        assert c.post("/generate", json={"labels": ["red sphere"], "steps": 2}).status_code == 200  # free again


def test_health_reports_each_model_run_at_start_and_a_broken_export_stops_the_server(onnx_export, tmp_path):
    import shutil

    from python.core.errors import UserError

    with TestClient(build_app(onnx_export, threads=2)) as c:
        h = c.get("/health").json()
        assert set(h["warm_up_ms"]) == {"gan", "ldm", "judge", "classifier"} and h["limits"]["max_work"] == 16_384
    broken = tmp_path / "broken"
    shutil.copytree(onnx_export, broken)
    gen = broken / "generator.onnx"
    gen.write_bytes(gen.read_bytes()[:1000])  # truncated
    with pytest.raises(UserError, match="generator.onnx: its checksum differs"):
        build_app(broken, threads=2)


def test_server_process_finishes_in_flight_requests_on_sigterm(onnx_export):
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--export", str(onnx_export), "--port", str(port),
                             "--threads", "1"])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        result = {}
        body = {"labels": ["red sphere"], "n": 16, "steps": 60, "sampler": "ddim"}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/generate", json=body, timeout=60)))
        t.start()
        time.sleep(0.5)  # the request is in the sampler now
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert result["r"].status_code == 200 and result["r"].headers["x-images"] == "16"
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        proc.kill()


def test_load_test_smoke(onnx_export, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "load.json"
    subprocess.run([sys.executable, "bench/load_test.py", "--export", str(onnx_export), "--data", str(tmp_path),
                    "--requests", "6", "--concurrency", "1", "3", "--steps", "2", "--check", "2", "--threads", "1",
                    "--json", str(out)], check=True)
    res = json.loads(out.read_text())
    assert [(r["mode"], r["concurrency"]) for r in res["runs"]] == [
        ("batching", 1), ("batching", 3), ("no-batching", 1), ("no-batching", 3)]
    for r in res["runs"]:
        assert r["answered"] == 6 and r["errors"] == 0 and r["mismatched"] == 0 and r["images_per_sec"] > 0
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and 0 <= r["judge_accuracy"] <= 1


def test_a_layout_export_is_served_with_its_places_and_refuses_more_objects_than_it_places(layout_export):
    """A layout denoiser and a layout one-step generator (python/core/layout.py): each request's places are drawn from
    its seed, as the runtime draws them; a label set larger than a model's placement prior holds is a 400 naming
    that model's bound."""
    _, ex = layout_export
    with TestClient(build_app(ex, window_ms=5, max_batch=64, max_queue=64, threads=2)) as c:
        body = {"labels": ["red sphere", "cyan cylinder"], "n": 2, "steps": 3, "seed": 4, "format": "json"}
        r = c.post("/generate", json=body)
        assert r.status_code == 200, r.text
        ref = Pipeline(ExportFolder(ex, threads=2)).generate(condition(parse_request(body, Limits())), "ldm", steps=3,
                                                             seeds=[(4, 2)])
        assert np.abs(_decode_pngs(r.json()).astype(int) - to_uint8(ref).astype(int)).max() <= 1
        four = {"labels": ["red sphere", "cyan cylinder", "gray cube", "blue cube"], "steps": 3}
        r = c.post("/generate", json=four)
        assert r.status_code == 400 and "LDM places at most 3" in r.text
        r = c.post("/generate", json={**four, "model": "gan"})
        assert r.status_code == 400 and "GAN places at most 3" in r.text
        r = c.post("/generate", json={**body, "model": "gan"})
        assert r.status_code == 200, r.text
        ref = Pipeline(ExportFolder(ex, threads=2)).generate(condition(parse_request(body, Limits())), "gan",
                                                             seeds=[(4, 2)])
        assert np.abs(_decode_pngs(r.json()).astype(int) - to_uint8(ref).astype(int)).max() <= 1
