import json

import numpy as np
import pytest
import torch

from python import gan as G
from python.errors import UserError
from python.ship import main as ship
from python.train_gan import gan_latents
from python.train_gan import main as train_gan


def test_shapes_projection_and_condition():
    cfg = G.GANConfig(g_channels=(16, 16, 16), d_channels=(16, 16, 16))
    gen, disc = G.Generator(cfg).eval(), G.Discriminator(cfg)
    z = torch.randn(3, cfg.z_dim)
    a, b = torch.zeros(3, 24), torch.zeros(3, 24)
    a[:, [1, 9]], b[:, 20] = 1, 1
    x = gen(z, a)
    assert x.shape == (3, 4, 16, 16) and not torch.allclose(x, gen(z, b))
    score, aux = disc(x, a)
    assert score.shape == (3,) and aux.shape == (3, 24)
    with pytest.raises(UserError, match="g_channels"):
        G.GANConfig(g_channels=(16, 16))


def test_train_resume_and_generate(tiny_data, parts, tmp_path):
    run = tmp_path / "run"
    args = ["--preset", "tiny", "--data", str(tiny_data), "--vae", str(parts / "vae"),
            "--judge", str(parts / "judge" / "checkpoint.pth"), "--run-dir", str(run)]
    train_gan([*args, "--steps", "3"])
    train_gan([*args, "--resume"])
    assert "resumed at step 3" in (run / "log.txt").read_text()
    evals = [json.loads(m) for m in (run / "metrics.jsonl").read_text().splitlines() if "heldout_subset" in m]
    assert [e["step"] for e in evals] == [3, 6]
    gen, cfg = G.load(run / "final")
    cond = np.zeros((5, 24), np.float32)
    cond[:, 3] = 1
    lat = gan_latents(gen, cond, seed=4)
    assert lat.shape == (5, 4, 16, 16) and torch.equal(lat, gan_latents(gen, cond, seed=4))
    assert cfg["trained_steps"] == 6
    with pytest.raises(UserError, match="no GAN here"):
        G.load(tmp_path)
    ship(["gan", "--run", str(run), "--out", str(tmp_path / "shipped")])
    shipped, scfg = G.load(tmp_path / "shipped")
    assert scfg["trained_steps"] == 6 and scfg["vae_sha"] == cfg["vae_sha"]
    torch.testing.assert_close(gan_latents(shipped, cond, seed=4), lat, atol=2e-2, rtol=2e-2)
    with pytest.raises(SystemExit):
        ship(["ldm", "--run", str(run), "--out", str(tmp_path / "wrong")])  # a GAN run is not an LDM
