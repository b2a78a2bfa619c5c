import json

import numpy as np
import pytest
import torch
from PIL import Image

from python.eval_gen import main
from python.evaluation.metrics import spread


def test_spread_is_mean_pairwise_distance_within_groups():
    f = torch.tensor([[0.0, 0], [3, 4], [1, 1], [1, 1]])  # group 1: one pair 5 apart; group 2: identical
    assert spread(f, 2) == pytest.approx(2.5)


def test_eval_ldm_writes_scores_grids_and_process(tiny_weights, tiny_data, tmp_path, capsys):
    out, js = tmp_path / "out", tmp_path / "eval.json"
    main(["--model", "ldm", "--weights", str(tiny_weights), "--data", str(tiny_data), "--files", "test.json",
          "new_test.json", "--seeds", "0", "1", "--steps", "3", "--guidance", "1", "2", "--apg-norm", "0", "3", "--limit", "6",
          "--class-scale", "0", "--diversity-conditions", "2", "--per-condition", "3", "--out", str(out), "--json", str(js)])
    rep = json.loads(js.read_text())
    assert [(r["steps"], r["guidance"], r["apg_norm"]) for r in rep["results"]] == [
        (3, 1.0, 0.0), (3, 1.0, 3.0), (3, 2.0, 0.0), (3, 2.0, 3.0)]
    # at guidance 1 there is nothing to project: the same images; at 2 the projected guidance differs
    same, differs = rep["results"][0]["files"]["test.json"], rep["results"][1]["files"]["test.json"]
    assert same["per_seed"] == differs["per_seed"]
    for r in rep["results"]:
        t = r["files"]["test.json"]
        assert t["n"] == 6 and len(t["per_seed"]) == 2 and 0 <= t["accuracy_mean"] <= 1
        assert t["accuracy_std"] == pytest.approx(np.std(t["per_seed"]), abs=1e-4)
        assert t["second_judge_mean"] is not None and set(t["by_objects"]) <= {"1", "2", "3"}
        assert r["diversity"]["real"] > 0 and r["diversity"]["ratio"] == pytest.approx(
            r["diversity"]["generated"] / r["diversity"]["real"], rel=1e-3)
        assert r["diversity"]["features"] == "second judge"
        assert r["diversity"]["pixel_real"] > 0 and r["diversity"]["pixel_ratio"] == pytest.approx(
            r["diversity"]["pixel_generated"] / r["diversity"]["pixel_real"], rel=1e-3)
        assert all(0.0 <= f["unrequested_object_rate"] <= 1.0 for f in r["files"].values())
    assert Image.open(out / "ldm_test_s3_g1.png").size[0] == 6 * 66 + 2
    assert Image.open(out / "ldm_test_s3_g2_apg3.png") != Image.open(out / "ldm_test_s3_g2.png")
    with pytest.raises(SystemExit):
        main(["--model", "ldm", "--weights", str(tiny_weights), "--data", str(tiny_data), "--apg-norm", "-2"])
    assert "--apg-norm must be 0 (classifier-free guidance), a positive norm cap or inf, got -2" in capsys.readouterr().err
    process = Image.open(out / "ldm_denoising_process.png")
    assert process.size[1] == 68 and process.size[0] > 2 * 66  # one row: intermediate frames + the result


def test_eval_gan_and_bad_model(tiny_weights, tiny_data, tmp_path):
    rep = main(["--model", "gan", "--weights", str(tiny_weights), "--data", str(tiny_data), "--files", "test.json",
                "--seeds", "0", "1", "2", "--limit", "4", "--diversity-conditions", "2", "--per-condition", "2"])
    assert len(rep["results"]) == 1 and len(rep["results"][0]["files"]["test.json"]["per_seed"]) == 3
    with pytest.raises(SystemExit):
        main(["--model", "vae", "--weights", str(tiny_weights), "--data", str(tiny_data)])


def test_without_a_second_judge_diversity_uses_the_primary_and_says_so(tiny_weights, tiny_data, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    for d in tiny_weights.iterdir():
        if d.name != "judge2":
            (weights / d.name).symlink_to(d)
    rep = main(["--model", "gan", "--weights", str(weights), "--data", str(tiny_data), "--files", "test.json",
                "--seeds", "0", "--limit", "4", "--diversity-conditions", "2", "--per-condition", "2"])
    r = rep["results"][0]
    assert r["files"]["test.json"]["second_judge_mean"] is None
    assert r["diversity"]["features"] == "primary judge" and r["diversity"]["real"] > 0


def test_object_rates_count_objects_beyond_and_missing_from_the_label_set():
    """A stand-in judge with fixed outputs: image 0 shows exactly its label, image 1 one extra object."""
    import torch

    from python.evaluation.metrics import object_rates

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            p = torch.full((len(x), 24), 0.1)
            p[:, 0] = 0.9
            p[1, 7] = 0.8  # the unrequested one
            return p

    labels = np.zeros((2, 24), np.float32)
    labels[:, 0] = 1
    assert object_rates(Fixed(), torch.zeros(2, 3, 64, 64), labels) == {"unrequested": 0.5, "missing": 0.0}
    labels[1, 7] = 1  # now it was requested
    assert object_rates(Fixed(), torch.zeros(2, 3, 64, 64), labels) == {"unrequested": 0.0, "missing": 0.0}
    labels[0, 3] = 1  # asked for, not seen: 1 of the 4 requested objects is missing
    assert object_rates(Fixed(), torch.zeros(2, 3, 64, 64), labels) == {"unrequested": 0.0, "missing": 0.25}


def test_fidelity_figures_beside_their_floors_for_files_large_enough(tiny_weights, tiny_data, tmp_path):
    rep = main(["--model", "gan", "--weights", str(tiny_weights), "--data", str(tiny_data), "--files", "test.json",
                "heldout.json", "--seeds", "0", "--limit", "12", "--diversity-conditions", "2", "--per-condition", "2"])
    fid = rep["fidelity"]
    assert fid["features"].startswith("second judge") and set(fid["floors"]) == {"test.json", "heldout.json"}
    keys = {"fd", "kid_x1000", "kid_std_x1000", "precision", "recall", "contrast_ratio", "sharpness_ratio",
            "unrequested", "missing", "n_real", "n_generated", "fd_reliable", "kid_subset", "counted_surplus",
            "counted_deficit", "counted_excess_mean"}
    for name in ("test.json", "heldout.json"):
        floors, got = fid["floors"][name], rep["results"][0]["files"][name]["fidelity"]
        assert set(floors) == {"real_vs_real", "vae_reconstruction"} and keys <= set(got)
        assert got["n_generated"] == got["n_real"] == 12 and not got["fd_reliable"]
        # an untrained generator is further from the renders than a second set of renders is
        assert got["kid_x1000"] > floors["real_vs_real"]["kid_x1000"] and got["fd"] > floors["real_vs_real"]["fd"]
    from bench.fidelity_table import table

    lines = table([rep, rep], "test.json").splitlines()  # the README's table: floors, then each report's settings
    assert len(lines) == 2 + 2 + 2 and lines[2].startswith("| floor: real renders vs real renders | | | ")
    assert lines[4].startswith("| GAN path, one pass | 1 | ") and "(n 12: biased)" in lines[4]
    assert lines[0].endswith("counted objects: more / fewer than asked |") and all(
        line.count("|") == lines[0].count("|") for line in lines[2:])
    small = main(["--model", "gan", "--weights", str(tiny_weights), "--data", str(tiny_data), "--files", "test.json",
                  "--seeds", "0", "--limit", "4", "--diversity-conditions", "2", "--per-condition", "2"])
    assert small["fidelity"]["floors"] == {} and "fidelity" not in small["results"][0]["files"]["test.json"]


def test_fidelity_table_names_the_guidance():
    from bench.fidelity_table import setting_name

    report = {"model": "ldm", "sampler": "dpmpp", "best_of": 1}
    row = {"steps": 10, "guidance": 5.0}
    assert setting_name(report, row) == "LDM, dpmpp 10 steps, guidance 5"  # a report from before APG: classifier-free
    assert setting_name(report, {**row, "apg_norm": 0.0}) == "LDM, dpmpp 10 steps, guidance 5"
    assert setting_name(report, {**row, "apg_norm": 5.0}) == "LDM, dpmpp 10 steps, guidance 5 (APG, norm cap 5)"
    assert setting_name(report, {**row, "apg_norm": 5.0, "class_scale": 2.0}) == \
        "LDM, dpmpp 10 steps, guidance 5 (APG, norm cap 5), classifier guidance 2"
    assert setting_name(report, {**row, "apg_norm": 5.0, "class_scale": 2.0, "count_weight": 2.5}) == \
        "LDM, dpmpp 10 steps, guidance 5 (APG, norm cap 5), classifier guidance 2 with count term 2.5"
    assert setting_name(report, {**row, "apg_norm": 5.0, "class_scale": 2.0, "count_weight": 2.5, "class_iters": 3}) \
        == ("LDM, dpmpp 10 steps, guidance 5 (APG, norm cap 5), classifier guidance 2 with count term 2.5, "
            "3 descent steps")


@pytest.mark.parametrize("module, args", [
    ("python.train_ldm", ["--data", "DATA", "--run-dir", "RUN", "--steps", "1"]),
    ("python.tune_ldm", ["--data", "DATA", "--run-dir", "RUN", "--init", "WEIGHTS/ldm", "--counter", "WEIGHTS/counter"]),
    ("python.distill", ["pairs", "--data", "DATA", "--out", "RUN"]),
    ("python.eval_gen", ["--model", "ldm", "--weights", "WEIGHTS", "--data", "DATA"]),
])
def test_every_cli_with_apg_norm_refuses_a_negative_one_in_one_line(module, args, tiny_data, tiny_weights, tmp_path,
                                                                     capsys):
    import importlib

    main_ = importlib.import_module(module).main
    args = [a.replace("DATA", str(tiny_data)).replace("RUN", str(tmp_path / "run")).replace("WEIGHTS", str(tiny_weights))
            for a in args]
    with pytest.raises(SystemExit) as e:
        main_([*args, "--apg-norm", "-1"])
    assert e.value.code == 2
    assert "error: --apg-norm must be 0 (classifier-free guidance), a positive norm cap or inf, got -1.0" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_ddim_eta_reaches_the_sampler_and_is_checked(tiny_weights, tiny_data, tmp_path, capsys):
    from python.evaluation.generators import TorchGenerator
    cond = np.eye(24, dtype=np.float32)[:4]
    plain = TorchGenerator("ldm", tiny_weights, "ddim")
    plain_x = plain.latents(cond, seed=0, steps=3, class_scale=0)
    noisy = TorchGenerator("ldm", tiny_weights, "ddim", eta=1.0)
    a, b = (noisy.latents(cond, seed=0, steps=3, class_scale=0) for _ in range(2))
    assert torch.equal(a, b) and not torch.allclose(a, plain_x, atol=1e-3)  # seeded noise, and it is used
    out, js = tmp_path / "out", tmp_path / "eval.json"
    main(["--model", "ldm", "--weights", str(tiny_weights), "--data", str(tiny_data), "--files", "test.json",
          "--seeds", "0", "--steps", "3", "--limit", "4", "--sampler", "ddim", "--eta", "0.5", "--class-scale", "0",
          "--diversity-conditions", "2", "--per-condition", "2", "--no-fidelity", "--out", str(out), "--json", str(js)])
    report = json.loads(js.read_text())
    assert report["eta"] == 0.5 and (out / "ldm_test_ddim_eta0.5_s3_g5_apg5.png").exists()
    assert report["results"][0]["sampler"] == "ddim"  # each setting names the sampler that ran it
    # at the schedule's every step the sampler is DDPM whatever --sampler says, and the report says so
    assert plain.sampler_for(plain.schedule.T) == "ddpm" and plain.sampler_for(3) == "ddim"
    refused = {"it needs --model ldm --sampler ddim": ["--eta", "0.5"],  # DPM-Solver++ (the default) has no noise
               "--eta must be between 0.0 and 1.0, got 2.0": ["--sampler", "ddim", "--eta", "2"]}
    for why, bad in refused.items():
        with pytest.raises(SystemExit):
            main(["--model", "ldm", "--weights", str(tiny_weights), "--data", str(tiny_data), *bad])
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err


def test_out_folder_made_before_the_work_when_no_grid_needs_it(tiny_weights, tiny_data, tmp_path):
    """--out a new folder with only heldout.json (no course grids): the denoising-process image still lands there
    (the folder was made for the grids alone, so this run ended in a traceback after all its sampling)."""
    out, js = tmp_path / "new" / "out", tmp_path / "eval.json"
    main(["--model", "ldm", "--weights", str(tiny_weights), "--data", str(tiny_data), "--files", "heldout.json",
          "--seeds", "0", "--steps", "3", "--limit", "4", "--class-scale", "0", "--diversity-conditions", "2",
          "--per-condition", "2", "--no-fidelity", "--out", str(out), "--json", str(js)])
    assert (out / "ldm_denoising_process.png").exists() and json.loads(js.read_text())["model"] == "ldm"
