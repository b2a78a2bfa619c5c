import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def test_latency_quick_writes_table_json_and_plot(tiny_weights, tiny_data, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "pareto.png"
    r = subprocess.run([sys.executable, "bench/latency.py", "--quick", "--weights", str(tiny_weights), "--data",
                        str(tiny_data), "--runs", "2", "--threads", "2", "--json", str(out), "--plot", str(png),
                        "--markdown", str(tmp_path / "t.md"), "--best-of", "1", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["peak_flops"]["fp32"] > 1e9 and res["peak_flops"]["bf16"] > 1e9
    got = {(x["model"], x["backend"], x["batch"]) for x in res["results"]}
    assert {("ldm", "torch-fp32", 32), ("ldm", "onnxruntime", 32), ("ldm", "onnxruntime", 1), ("ldm", "cpp", 32),
            ("gan", "onnxruntime", 256), ("baseline", "torch-fp32", 4), ("ldm", "onnxruntime-int8", 32),
            ("gan", "onnxruntime-int8", 256)} <= got
    assert res["peak_flops"]["int8"] > 1e9
    from export.quantize import nncf_available

    if nncf_available():  # OpenVINO fp32 and int8 rows beside the others, where the package is installed
        assert {("ldm", "openvino", 32), ("ldm", "openvino-int8", 32), ("gan", "openvino", 256),
                ("gan", "openvino-int8", 256)} <= got
        row = {(x["model"], x["backend"]): x for x in res["results"] if x.get("best_of", 1) == 1 and x["batch"] != 1}
        assert row["gan", "openvino"]["accuracy"] == row["gan", "onnxruntime"]["accuracy"]  # the same fp32 graphs
        assert row["gan", "openvino-int8"]["precision"] == "int8"  # its own quantized copies, its own accuracy
        assert set(row["gan", "openvino-int8"]["accuracy"]) == {"test.json", "new_test.json", "heldout.json"}
        assert res["profile"]["gan_openvino-int8"]["generator_s"] > 0 and res["profile"]["ldm_openvino-int8"]["decoder_s"] > 0
    else:
        assert not any(x["backend"].startswith("openvino") for x in res["results"])
        assert "openvino: the package is not installed" in r.stdout
    int8 = next(x for x in res["results"] if x["backend"] == "onnxruntime-int8" and x["model"] == "ldm")
    # its own accuracy and fidelity (the int8 models' images), its % of the int8 peak
    assert int8["precision"] == "int8" and set(int8["accuracy"]) == {"test.json", "new_test.json", "heldout.json"}
    assert int8["fraction_of_peak"] == pytest.approx(int8["achieved_flops"] / res["peak_flops"]["int8"], abs=1e-4)
    for x in res["results"]:
        assert x["images_per_sec"] > 0 and {"model", "backend", "sampler", "steps", "batch", "accuracy"} <= set(x)
        if x["model"] != "baseline":
            assert x["flops_per_image"] > 0 and 0 < x["fraction_of_peak"] < 2 and x["speedup_vs_baseline"] > 1
    ort = next(x for x in res["results"] if x["model"] == "ldm" and x["backend"] == "onnxruntime" and x["batch"] == 32)
    assert set(ort["accuracy"]) == {"test.json", "new_test.json", "heldout.json"} and 0 <= ort["accuracy"]["test.json"] <= 1
    assert set(ort["accuracy_second_judge"]) == {"test.json", "new_test.json", "heldout.json"}
    # --quick scores a stated sample of heldout.json, with fidelity beside each accuracy and the floors once
    assert res["conditions_limit"] == 128 and set(res["fidelity_floors"]) == {"test.json", "new_test.json", "heldout.json"}
    assert set(ort["fidelity"]) == {"test.json", "new_test.json", "heldout.json"} and ort["fidelity"]["heldout.json"]["n_generated"] == 40
    assert {"kid_x1000", "fd", "precision", "recall", "unrequested"} <= set(ort["fidelity"]["heldout.json"])
    picked = [x for x in res["results"] if x.get("best_of") == 2]  # best-of-2: onnxruntime only, its own accuracy
    assert [(x["model"], x["backend"], x["steps"], x["batch"]) for x in picked] == [
        ("ldm", "onnxruntime", 10, 1), ("ldm", "onnxruntime", 10, 32), ("gan", "onnxruntime", None, 1),
        ("gan", "onnxruntime", None, 256)]
    assert picked[0]["flops_per_image"] > 2 * ort["flops_per_image"] - res["decoder_flops_per_image"]
    assert set(picked[1]["accuracy"]) == {"test.json", "new_test.json", "heldout.json"}
    gan1 = next(x for x in res["results"] if x["model"] == "gan" and x["best_of"] == 1 and x["batch"] == 256)
    assert picked[3]["flops_per_image"] > 2 * gan1["flops_per_image"] - res["decoder_flops_per_image"]
    assert set(picked[3]["accuracy"]) == {"test.json", "new_test.json", "heldout.json"}
    b1 = next(x for x in res["results"] if x["batch"] == 1)
    assert b1["latency_ms_p50"] <= b1["latency_ms_p95"]
    assert png.stat().st_size > 10_000 and "img/s" in r.stdout
    table = (tmp_path / "t.md").read_text().splitlines()
    assert len(table) == 4 + len(res["results"]) and table[2].startswith("| ldm | torch-fp32 | dpmpp | 10 | 32 |")
    assert table[-1].startswith("Floors (heldout.json[:128]): real vs real ")
    assert any(row.startswith("| ldm | onnxruntime | dpmpp, best of 2 | 10 | 32 |") for row in table)
    assert any(row.startswith("| gan | onnxruntime | best of 2 |  | 256 |") for row in table)
    prof = res["profile"]["ldm_onnxruntime"]
    assert prof["batch"] == 32 and prof["denoiser_s"] > 0 and prof["decoder_s"] > 0
    assert abs(sum(prof["shares"].values()) - 1) < 0.01 and prof["shares"]["denoiser"] > 0
    gp = res["profile"]["gan_onnxruntime"]  # the GAN path's generator / decoder / rest, at its batch
    assert gp["batch"] == 256 and gp["generator_s"] > 0 and gp["decoder_s"] > 0
    assert abs(sum(gp["shares"].values()) - 1) < 0.01 and gp["shares"]["generator"] > 0
    for name in ("denoiser_ops_torch", "decoder_ops_torch"):
        ops = res["profile"][name]
        assert ops and all(0 <= o["share"] <= 1 for o in ops) and ops[0]["share"] >= ops[-1]["share"]
    assert "aten::" in " ".join(o["op"] for o in res["profile"]["denoiser_ops_torch"])
    # --replot redraws the plot and the table from the JSON alone, measuring nothing
    r = subprocess.run([sys.executable, "bench/latency.py", "--replot", str(out), "--plot", str(tmp_path / "re.png"),
                        "--markdown", str(tmp_path / "re.md")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "re.md").read_text() == (tmp_path / "t.md").read_text()
    assert (tmp_path / "re.png").stat().st_size > 10_000 and "peak matmul" not in r.stdout
    (tmp_path / "bad.json").write_text("{}")
    r = subprocess.run([sys.executable, "bench/latency.py", "--replot", str(tmp_path / "bad.json"), "--plot",
                        str(tmp_path / "x.png")], capture_output=True, text=True)
    assert r.returncode != 0 and "not a bench/latency.py JSON" in r.stderr and "Traceback" not in r.stderr


def test_matrix_restriction_and_its_errors():
    import argparse

    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from latency import FULL, QUICK, restrict

    from python.core.errors import UserError

    def args(**kw):
        base = dict(samplers=None, steps=None, backends=None, batches=None, files=None, no_latency=False, eta=0.0)
        return argparse.Namespace(**{**base, **kw})

    cfg = restrict(dict(FULL), args(samplers=["dpmpp"], steps=[10, 25], backends=["onnxruntime", "cpp"],
                                    batches=[256], files=["heldout.json"], no_latency=True))
    assert cfg["ldm"] == [("dpmpp", 10), ("dpmpp", 25)] and cfg["ldm_backends"] == ["onnxruntime", "cpp"]
    assert cfg["gan_backends"] == ["onnxruntime"] and cfg["latency_backends"] == []
    assert cfg["ldm_batches"] == cfg["gan_batches"] == [256] and cfg["files"] == ("heldout.json",)
    assert restrict(dict(FULL), args())["ldm"] == FULL["ldm"]  # nothing asked, nothing changed
    with pytest.raises(UserError, match="--batches"):
        restrict(dict(FULL), args(batches=[0]))
    # a sampler asked for is measured at the matrix's step counts, also where the matrix lacks it (--quick's)
    assert restrict(dict(QUICK), args(samplers=["ddim"]))["ldm"] == [("ddim", 10)]
    assert restrict(dict(QUICK), args(samplers=["ddim"], eta=0.5))["ldm"] == [("ddim", 10)]
    with pytest.raises(UserError, match="--eta 0.5 is DDIM's noise.*hold no DDIM; add --samplers ddim"):
        restrict(dict(QUICK), args(eta=0.5))


def test_eta_reaches_every_ddim_backend(tiny_weights, tiny_data, tmp_path):
    """--eta: the DDIM rows sample with DDIM's noise (the same step noise on torch and ONNX Runtime, so their images
    agree), the rows and tables say so, and DPM-Solver++ rows stay deterministic."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from latency import Models, conditions_for, ldm_runner

    m = Models(tiny_weights, None, 2)
    cond = conditions_for(4)
    ort = {e: ldm_runner(m, "onnxruntime", "ddim", 4, 2.0, cond, eta=e)() for e in (0.0, 0.5)}
    torch_half = ldm_runner(m, "torch-fp32", "ddim", 4, 2.0, cond, eta=0.5)().numpy()
    assert np.abs(ort[0.5] - ort[0.0]).max() > 1e-2  # the noise is used
    assert np.abs(torch_half - ort[0.5]).max() < 1e-3  # and it is the same noise on both backends
    dpm = [ldm_runner(m, "onnxruntime", "dpmpp", 4, 2.0, cond, eta=e)() for e in (0.0, 0.5)]
    assert np.array_equal(dpm[0], dpm[1])  # no eta outside DDIM

    out, md = tmp_path / "eta.json", tmp_path / "eta.md"
    r = subprocess.run([sys.executable, "bench/latency.py", "--quick", "--weights", str(tiny_weights), "--data",
                        str(tiny_data), "--samplers", "ddim", "--eta", "0.5", "--backends", "onnxruntime", "cpp",
                        "--batches", "4", "--no-latency", "--no-fidelity", "--files", "test.json", "--runs", "1",
                        "--json", str(out), "--markdown", str(md)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    ldm = [x for x in res["results"] if x["model"] == "ldm"]
    assert res["eta"] == 0.5 and {(x["backend"], x["sampler"], x["eta"]) for x in ldm} == {
        ("onnxruntime", "ddim", 0.5), ("cpp", "ddim", 0.5)}
    assert all("eta" not in x for x in res["results"] if x["model"] != "ldm")
    assert "| ldm | onnxruntime | ddim eta0.5 | 10 | 4 |" in md.read_text()
    r = subprocess.run([sys.executable, "bench/latency.py", "--quick", "--weights", str(tiny_weights), "--eta", "1.5"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--eta must be between 0.0 and 1.0, got 1.5" in r.stderr
