import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from python.core.diffusion import Schedule
from python.core.errors import UserError
from python.core.images import image_grid
from python.models.classifier import LatentClassifier
from python.models.denoiser import Denoiser, DenoiserConfig, load_denoiser, save_denoiser
from python.models.sampling import decode, ldm_latents
from python.models.vae import Decoder, load_vae
from python.ship import main as ship
from python.train_ldm import main as train_ldm
from python.training.losses import min_snr_weight


def _args(tiny_data, parts, run, *extra):
    return ["--preset", "tiny", "--data", str(tiny_data), "--vae", str(parts / "vae"),
            "--judge", str(parts / "judge" / "checkpoint.pth"), "--run-dir", str(run), *extra]


@pytest.mark.parametrize("cond, pooled", [("tokens", False), ("tokens", True), ("sum", False)])
def test_denoiser_shapes_and_condition_matters(cond, pooled):
    m = Denoiser(DenoiserConfig(width=32, depth=2, heads=2, cond=cond, pooled=pooled))
    for p in m.parameters():  # adaLN-zero starts at zero output; perturb so the condition can show
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 900])
    a, b = torch.zeros(2, 24), torch.zeros(2, 24)
    a[:, 1], b[:, 9] = 1, 1
    assert m(x, t, a).shape == x.shape
    assert not torch.allclose(m(x, t, a), m(x, t, b))  # different objects, different output
    assert not torch.allclose(m(x, t, a), m(x, t, torch.zeros(2, 24)))  # the empty set is its own condition


def test_min_snr_weights():
    sch = Schedule("cosine", prediction="epsilon")
    t = torch.tensor([0, 500, 999])
    w = min_snr_weight(sch, t, 5.0)
    snr = sch.snr(t.numpy())
    assert np.allclose(w.numpy(), np.minimum(snr, 5) / snr, rtol=1e-5) and w[2] == pytest.approx(1.0)
    assert torch.equal(min_snr_weight(sch, t, 0.0), torch.ones(3))


def test_train_resume_and_sample(tiny_data, parts, tmp_path, capsys):
    run = tmp_path / "run"
    train_ldm(_args(tiny_data, parts, run, "--steps", "3", "--no-bf16"))
    assert (run / "latest").read_text().strip() == "ckpt-00000003"
    train_ldm(_args(tiny_data, parts, run, "--resume", "--no-bf16"))
    assert "resumed at step 3" in (run / "log.txt").read_text()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "heldout_subset" in m]
    assert [m["step"] for m in evals] == [3, 6] and 0 <= evals[-1]["heldout_subset"]["accuracy"] <= 1
    assert (run / "samples" / "heldout-00000006.png").exists()
    model, cfg = load_denoiser(run / "final")
    sch = Schedule(**cfg["schedule"])
    cond = np.zeros((3, 24), np.float32)
    cond[:, [9, 7, 22]] = 1  # red sphere, yellow cube, cyan cylinder
    seen = []
    lat = ldm_latents(model, sch, cond, "ddim", 5, 2.0, seed=1, on_step=lambda i, x, sl: seen.append(i))
    assert lat.shape == (3, 4, 16, 16) and seen == list(range(5))
    assert torch.equal(lat, ldm_latents(model, sch, cond, "ddim", 5, 2.0, seed=1))  # deterministic for a seed
    assert not torch.equal(lat, ldm_latents(model, sch, cond, "ddim", 5, 2.0, seed=2))
    images = decode(Decoder(load_vae(parts / "vae")), lat)
    assert images.shape == (3, 3, 64, 64) and images.abs().max() <= 1
    assert image_grid(images, cols=8).shape == (2 + 66, 2 + 3 * 66, 3)  # fewer than 8: one row of 3
    with pytest.raises(UserError, match="no LDM here"):
        load_denoiser(tmp_path)
    ship(["ldm", "--run", str(run), "--out", str(tmp_path / "shipped")])
    shipped, scfg = load_denoiser(tmp_path / "shipped")
    assert scfg["trained_steps"] == 6 and scfg["vae_sha"] == cfg["vae_sha"] and scfg["schedule"] == cfg["schedule"]
    for (k, a), b in zip(model.state_dict().items(), shipped.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=k)  # the EMA weights, through fp16


def test_pooled_embedding_tells_the_set_size_and_warm_starts_unchanged(tiny_data, parts, tmp_path, capsys):
    """With cond tokens alone, the size of the set reaches a patch only through how the softmax over the present
    tokens splits its weight; the pooled embedding adds a linear map of the whole set to the time embedding. It
    starts at zero, so --init from a model without it computes the same function until training moves it."""
    torch.manual_seed(0)
    plain = Denoiser(DenoiserConfig(width=32, depth=2, heads=2))
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.05)
    pooled = Denoiser(DenoiserConfig(width=32, depth=2, heads=2, pooled=True))
    assert pooled.load_state_dict(plain.state_dict(), strict=False).missing_keys == ["cond_emb.weight", "cond_emb.bias"]
    x, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([3, 900]), torch.zeros(2, 24)
    cond[0, 1], cond[1, [1, 5]] = 1, 1
    torch.testing.assert_close(pooled(x, t, cond), plain(x, t, cond), rtol=0, atol=0)
    torch.nn.init.normal_(pooled.cond_emb.weight, std=0.5)
    assert not torch.allclose(pooled(x, t, cond), plain(x, t, cond))

    # train_ldm --init: a saved model without the pooled embedding warm-starts one with it (the default)
    save_denoiser(plain, tmp_path / "plain", {"schedule": Schedule("cosine", prediction="v_prediction").config()})
    run = tmp_path / "warm"
    train_ldm(_args(tiny_data, parts, run, "--steps", "2", "--eval-every", "2", "--no-bf16", "--init",
                    str(tmp_path / "plain"), "--lr", "0"))
    warm, warm_cfg = load_denoiser(run / "final")
    # the warm start is on record with the weights it trained: the folder and its files' checksums
    _, plain_cfg = load_denoiser(tmp_path / "plain")
    assert warm_cfg["init_from"] == {"path": str((tmp_path / "plain").resolve()), "sha256": plain_cfg["sha256"]}
    # --eval-data: the held-out conditions come from that folder, not --data (here: two 3-object conditions)
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "heldout.json").write_text(json.dumps([["red sphere", "blue cube", "gray cylinder"]] * 2))
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "heldout_subset" in line]
    assert set(evals[-1]["heldout_subset"]["by_objects"]) != {"3"}
    run2 = tmp_path / "warm_probe"
    train_ldm(_args(tiny_data, parts, run2, "--steps", "1", "--eval-every", "1", "--no-bf16",
                    "--eval-data", str(probe)))
    evals = [json.loads(line) for line in (run2 / "metrics.jsonl").read_text().splitlines() if "heldout_subset" in line]
    assert set(evals[-1]["heldout_subset"]["by_objects"]) == {"3"}
    assert warm.cfg.pooled and warm.cond_emb.weight.abs().max() == 0  # lr 0: nothing moved, the new part is zero
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(warm.state_dict()[k], v, msg=k)
    big = Denoiser(DenoiserConfig(width=64, depth=2, heads=2))
    save_denoiser(big, tmp_path / "big", {})
    with pytest.raises(SystemExit):
        train_ldm(_args(tiny_data, parts, tmp_path / "bad", "--init", str(tmp_path / "big"), "--no-bf16"))
    assert "its denoiser {'width': 64" in capsys.readouterr().err


def test_token_update_lets_the_class_tokens_read_the_image_and_warm_starts_unchanged(tiny_data, parts, tmp_path):
    """token_update: after each block but the last, the class tokens attend to the patches, so a later block's
    patches read tokens that depend on the image. Zero-initialised, so --init from a model without it computes
    the same function."""
    torch.manual_seed(0)
    plain = Denoiser(DenoiserConfig(width=32, depth=3, heads=2))
    for q in plain.parameters():
        torch.nn.init.normal_(q, std=0.05)
    two_way = Denoiser(DenoiserConfig(width=32, depth=3, heads=2, token_update=True))
    missing = two_way.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith(("blocks.0.", "blocks.1.")) for k in missing)  # not the last block
    x, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([3, 900]), torch.zeros(2, 24)
    cond[0, 1], cond[1, [1, 5]] = 1, 1
    torch.testing.assert_close(two_way(x, t, cond), plain(x, t, cond), rtol=0, atol=0)
    for blk in two_way.blocks[:2]:
        torch.nn.init.normal_(blk.proj_t.weight, std=0.5)
    # the tokens now carry what they read from the image: the output moves, and one sample's tokens are not
    # another's (a change to sample 1's latent leaves sample 0's output alone)
    assert not torch.allclose(two_way(x, t, cond), plain(x, t, cond))
    x2 = x.clone()
    x2[1] += 1.0
    out, out2 = two_way(x, t, cond), two_way(x2, t, cond)
    torch.testing.assert_close(out[0], out2[0])
    assert not torch.allclose(out[1], out2[1])
    # it exports like the rest (ONNX and TorchScript, a dynamic batch, verified against torch within 1e-4)
    from export.to_onnx import export_onnx, export_torchscript
    example, check = dict(x=x, t=t, cond=cond), dict(x=torch.randn(3, 4, 16, 16), t=torch.tensor([999, 10, 500]),
                                                     cond=torch.eye(3, 24) + torch.eye(3, 24).roll(5, 1))
    assert export_onnx(two_way, example, ["out"], tmp_path / "d.onnx", check)["verified_max_rel_err"] <= 1e-4
    assert export_torchscript(two_way, example, tmp_path / "d.pt", check)["verified_max_rel_err"] <= 1e-4
    with pytest.raises(UserError, match="token_update needs cond='tokens'"):
        DenoiserConfig(cond="sum", token_update=True)
    # train_ldm --init --token-update from a saved model without it: nothing moves at lr 0, the new parts stay zero
    save_denoiser(plain, tmp_path / "plain", {"schedule": Schedule("cosine", prediction="v_prediction").config()})
    run = tmp_path / "warm"
    train_ldm(_args(tiny_data, parts, run, "--steps", "2", "--eval-every", "2", "--no-bf16", "--init",
                    str(tmp_path / "plain"), "--lr", "0", "--depth", "3", "--no-pooled", "--token-update"))
    warm, _ = load_denoiser(run / "final")
    assert warm.cfg.token_update and warm.blocks[0].proj_t.weight.abs().max() == 0
    assert not hasattr(warm.blocks[2], "proj_t")
    torch.testing.assert_close(warm(x, t, cond), plain(x, t, cond))


def test_stop_after_checkpoints_saves_and_resumes(tiny_data, parts, tmp_path, capsys):
    run = tmp_path / "run"
    # a budget of 0 minutes: one step, then a checkpoint off the save interval and final/, exit without error
    train_ldm(_args(tiny_data, parts, run, "--steps", "6", "--save-every", "4", "--no-bf16", "--stop-after", "0"))
    assert (run / "latest").read_text().strip() == "ckpt-00000001"
    assert "stopped at step 1 of 6" in (run / "log.txt").read_text()
    saved = json.loads((run / "final" / "config.json").read_text())
    assert saved["trained_steps"] == 1 and saved["stopped_early"] is True
    train_ldm(_args(tiny_data, parts, run, "--steps", "6", "--save-every", "4", "--no-bf16", "--resume"))
    assert "resumed at step 1" in (run / "log.txt").read_text()
    saved = json.loads((run / "final" / "config.json").read_text())
    assert saved["trained_steps"] == 6 and "stopped_early" not in saved
    with pytest.raises(SystemExit):
        train_ldm(_args(tiny_data, parts, tmp_path / "bad", "--stop-after", "-1"))
    assert "--stop-after must be a number of minutes >= 0" in capsys.readouterr().err


def test_ddp_two_processes_on_cpu(tiny_data, parts, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m",
           "python.train_ldm", *_args(tiny_data, parts, run, "--no-bf16")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "config.json").read_text())["world"] == 2
    assert (run / "final" / "denoiser.safetensors").exists()


def test_torch_call_and_latent_set_move():
    """The trainers' GPU path in miniature: torch_call takes numpy arrays and returns the float32 numpy of the
    model's own output; a LatentSet moved with .to() samples on its device from a generator living there."""
    from python.models.sampling import torch_call
    from python.training.latents import LatentSet

    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(in_channels=8, width=32, depth=1, heads=2)).eval()
    x, t = torch.randn(3, 8, 16, 16), torch.tensor([1, 500, 999])
    cond = torch.zeros(3, 24)
    cond[:, 5] = 1
    out = torch_call(model, "cpu")(x.numpy(), t.numpy(), cond.numpy())
    with torch.no_grad():
        assert out.dtype == np.float32 and np.array_equal(out, model(x, t, cond).numpy())
    lat = LatentSet(torch.randn(10, 8, 16, 16).half(), torch.rand(10, 8, 16, 16).half(), torch.eye(10, 24), 0.5).to("cpu")
    idx = torch.tensor([0, 3])
    a = lat.sample(idx, torch.Generator().manual_seed(1))
    b = lat.sample(idx, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 8, 16, 16) and a.dtype == torch.float32
    noise = torch.randn((2, 8, 16, 16), generator=torch.Generator().manual_seed(1))
    expected = (lat.mean[idx].float() + lat.std[idx].float() * noise) * 0.5
    assert torch.allclose(a, expected)


def test_class_term_on_predicted_x0_lowers_the_classifiers_bce(tiny_data, parts, tmp_path):
    """--cls-weight: two runs with the same seed and batches, without and with the term; the one with it ends
    with a lower BCE of that classifier on the x_0 the denoiser predicts, and logs the term."""
    import torch.nn.functional as F

    from python.core.diffusion import x0_eps
    from python.models.classifier import load_classifier, save_classifier
    from python.models.vae import vae_digest
    from python.training.latents import load_latents

    torch.manual_seed(0)
    cls = LatentClassifier(4).eval()
    with torch.no_grad():
        for p in cls.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_classifier(cls, tmp_path / "cls", {"vae_sha": vae_digest(parts / "vae")})
    cls = load_classifier(tmp_path / "cls")[0]
    lat = load_latents(tiny_data, parts / "vae")
    z0, cond = lat.mean[:8], lat.labels[:8]
    sch = Schedule("cosine", prediction="v_prediction")
    t = torch.arange(8) * 120
    a, s = (torch.from_numpy(c).float()[:, None, None, None] for c in sch.coeffs(t.numpy()))
    x_t = a * z0 + s * torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    bce = {}
    for weight in ("0", "20"):
        run = tmp_path / f"run-{weight}"
        train_ldm(_args(tiny_data, parts, run, "--no-bf16", "--ema", "0", "--lr", "3e-3", "--steps", "8",
                        "--eval-every", "8", "--cls-weight", weight, "--cls-classifier", str(tmp_path / "cls")))
        model = load_denoiser(run / "final")[0].eval()
        with torch.no_grad():
            x0 = x0_eps(x_t, model(x_t, t, cond), a, s, "v_prediction")[0]
            bce[weight] = F.binary_cross_entropy_with_logits(cls(x0), cond).item()
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert any("cls" in m for m in logged) == (weight != "0")
    assert bce["20"] < bce["0"] - 1e-3, bce
    with pytest.raises(SystemExit):
        train_ldm(_args(tiny_data, parts, tmp_path / "bad", "--cls-weight", "-1"))
    with pytest.raises(SystemExit):
        train_ldm(_args(tiny_data, parts, tmp_path / "bad2", "--cls-weight", "1", "--cls-max-t", "0",
                        "--cls-classifier", str(tmp_path / "cls")))


def test_weights_an_init_lacks_train_at_their_own_rate(tiny_data, parts, tmp_path, monkeypatch):
    """--new-lr-mult: a pooled embedding added to a warm start begins at zero and gets M x --lr; the rest keeps --lr."""
    train_ldm(_args(tiny_data, parts, tmp_path / "plain", "--steps", "1", "--no-pooled", "--no-bf16"))
    groups = []
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: groups.append((params, kw)) or adamw(params, **kw))
    train_ldm(_args(tiny_data, parts, tmp_path / "run", "--steps", "1", "--pooled", "--no-bf16", "--lr", "1e-4",
                    "--init", str(tmp_path / "plain" / "final"), "--new-lr-mult", "30"))
    (params, kw), = groups
    model, _ = load_denoiser(tmp_path / "run" / "final")
    # (the schedule scales each group's rate by its warm-up factor; "initial_lr" is the rate it scales)
    assert kw["lr"] == 1e-4 and len(params) == 2 and params[0]["initial_lr"] == 1e-4
    assert params[1]["initial_lr"] == pytest.approx(3e-3)
    assert [tuple(p.shape) for p in params[1]["params"]] == [tuple(p.shape) for p in model.cond_emb.parameters()]
    assert sum(p.numel() for g in params for p in g["params"]) == sum(p.numel() for p in model.parameters())
    with pytest.raises(SystemExit):  # without a warm start there is nothing new to speed up
        train_ldm(_args(tiny_data, parts, tmp_path / "r2", "--steps", "1", "--new-lr-mult", "30"))
    assert not (tmp_path / "r2").exists()
