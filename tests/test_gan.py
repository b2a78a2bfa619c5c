import json

import numpy as np
import pytest
import torch

from python.core.errors import UserError
from python.models.classifier import LatentClassifier
from python.models.gan import Discriminator, GANConfig, Generator
from python.models.generators import load_generator
from python.models.sampling import gan_latents
from python.ship import main as ship
from python.train_gan import main as train_gan


def test_shapes_projection_and_condition():
    cfg = GANConfig(g_channels=(16, 16, 16), d_channels=(16, 16, 16))
    gen, disc = Generator(cfg).eval(), Discriminator(cfg)
    z = torch.randn(3, cfg.z_dim)
    a, b = torch.zeros(3, 24), torch.zeros(3, 24)
    a[:, [1, 9]], b[:, 20] = 1, 1
    x = gen(z, a)
    assert x.shape == (3, 4, 16, 16) and not torch.allclose(x, gen(z, b))
    score, aux = disc(x, a)
    assert score.shape == (3,) and aux.shape == (3, 24)
    with pytest.raises(UserError, match="g_channels"):
        GANConfig(g_channels=(16, 16))
    assert LatentClassifier(cfg.latent_channels)(x).shape == (3, 24)


def test_classifier_holdout_rows_are_originals_and_their_mirrors():
    from python.training.classifier import heldout_rows

    rows = heldout_rows(40000, held=1000)
    assert len(rows) == 2000 and set(rows[:1000].tolist()) == set(range(19000, 20000))
    assert torch.equal(rows[1000:], rows[:1000] + 20000)
    assert len(heldout_rows(20, held=1000)) == 2  # small caches keep at most a tenth out


def test_train_resume_and_generate(tiny_data, parts, tmp_path):
    run = tmp_path / "run"
    args = ["--preset", "tiny", "--data", str(tiny_data), "--vae", str(parts / "vae"),
            "--judge", str(parts / "judge" / "checkpoint.pth"), "--run-dir", str(run)]
    train_gan([*args, "--steps", "3"])
    train_gan([*args, "--resume", "--lr-g", "1e-4", "--reset-ema"])
    log = (run / "log.txt").read_text()
    assert "resumed at step 3\n" in log and "EMA restarted from the generator" in log and "latent classifier loaded" in log  # phase 0 ran once
    assert "'lr_g': (0.0002, 0.0001)" in log  # the changed setting is logged (and applied to the optimiser)
    assert "'gan'" not in log  # tuples in the config are not mistaken for changes
    from python.training.rundir import load_checkpoint

    state = load_checkpoint(run)[2]
    assert state["opt_g"]["param_groups"][0]["lr"] == 1e-4 and state["opt_d"]["param_groups"][0]["lr"] == 2e-4
    metrics = [json.loads(m) for m in (run / "metrics.jsonl").read_text().splitlines()]
    cls = [m["classifier"] for m in metrics if "classifier" in m]
    assert len(cls) == 1 and cls[0]["steps"] == 4 and 0 <= cls[0]["accuracy"] <= 1
    evals = [m for m in metrics if "heldout_subset" in m]
    assert [e["step"] for e in evals] == [3, 6] and all("heldout_subset_raw" in e for e in evals)
    gen, cfg = load_generator(run / "final")
    cond = np.zeros((5, 24), np.float32)
    cond[:, 3] = 1
    lat = gan_latents(gen, cond, seed=4)
    assert lat.shape == (5, 4, 16, 16) and torch.equal(lat, gan_latents(gen, cond, seed=4))
    assert cfg["trained_steps"] == 6
    with pytest.raises(UserError, match="no GAN here"):
        load_generator(tmp_path)
    ship(["gan", "--run", str(run), "--out", str(tmp_path / "shipped")])
    shipped, scfg = load_generator(tmp_path / "shipped")
    assert scfg["trained_steps"] == 6 and scfg["vae_sha"] == cfg["vae_sha"]
    torch.testing.assert_close(gan_latents(shipped, cond, seed=4), lat, atol=2e-2, rtol=2e-2)
    ship(["gan", "--run", str(run), "--out", str(tmp_path / "raw"), "--raw"])
    raw, rcfg = load_generator(tmp_path / "raw")
    assert rcfg["weights"] == "raw" and scfg["weights"] == "ema"
    assert not torch.allclose(gan_latents(raw, cond, seed=4), lat, atol=1e-3)  # the live weights, not the EMA
    with pytest.raises(SystemExit):
        ship(["ldm", "--run", str(run), "--out", str(tmp_path / "wrong")])  # a GAN run is not an LDM
    # shipped weights are replaced only on purpose, and never under a card that describes the old ones
    before = (tmp_path / "shipped" / "generator.safetensors").read_bytes()
    (tmp_path / "shipped" / "MODEL_CARD.md").write_text("old card")
    for extra, message in (([], "already holds weights; pass --force"), (["--force"], "give the new one with --card"),
                           (["--force", "--card", str(tmp_path / "none.md")], "file not found")):
        with pytest.raises(UserError, match=message):
            ship.__wrapped__(["gan", "--run", str(run), "--out", str(tmp_path / "shipped"), "--raw", *extra])
    assert (tmp_path / "shipped" / "generator.safetensors").read_bytes() == before
    (tmp_path / "card.md").write_text("new card")
    ship(["gan", "--run", str(run), "--out", str(tmp_path / "shipped"), "--raw", "--force", "--card",
          str(tmp_path / "card.md")])
    assert (tmp_path / "shipped" / "MODEL_CARD.md").read_text() == "new card"
    assert load_generator(tmp_path / "shipped")[1]["weights"] == "raw"


def test_minibatch_std_sees_collapse():
    same = torch.randn(1, 16, 4, 4).expand(8, -1, -1, -1)
    assert torch.equal(Discriminator.minibatch_std(same), torch.zeros(8, 1))
    varied = Discriminator.minibatch_std(torch.randn(8, 16, 4, 4))
    assert varied.shape == (8, 1) and (varied > 0.5).all()
    assert Discriminator.minibatch_std(torch.randn(3, 16, 4, 4)).shape == (3, 1)  # odd batches group by 3


def test_add_noise_levels():
    from python.training.losses import noise_augment

    x = torch.zeros(4000, 2, 4, 4)
    assert noise_augment(x, 0.0) is x
    y = noise_augment(x, 1.0, torch.Generator().manual_seed(0))
    per_sample = y.flatten(1).std(1)
    assert per_sample.max() <= 1.3 and per_sample.min() < 0.1  # a random level in [0, max] per sample
    assert abs(per_sample.mean().item() - 0.5) < 0.05


def test_online_classifier_is_checkpointed_and_resumed(tiny_data, parts, tmp_path, capsys):
    from python.training.rundir import load_checkpoint

    run = tmp_path / "run"
    args = ["--preset", "tiny", "--data", str(tiny_data), "--vae", str(parts / "vae"), "--eval-every", "2",
            "--judge", str(parts / "judge" / "checkpoint.pth"), "--run-dir", str(run), "--cls-noise", "0.5",
            "--cls-fake", "1", "--keep", "2"]
    train_gan([*args, "--steps", "4"])
    assert len(list(run.glob("ckpt-*"))) == 2
    step, weights, state = load_checkpoint(run)
    phase0 = LatentClassifier(4)
    from safetensors.torch import load_file

    phase0.load_state_dict(load_file(str(run / "classifier.safetensors")))
    assert step == 4 and "opt_c" in state
    assert not torch.equal(weights["classifier"]["head.weight"], phase0.state_dict()["head.weight"])  # trained on
    train_gan([*args, "--steps", "6", "--resume"])
    metrics = [json.loads(m) for m in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_cls" in m for m in metrics)
    assert load_checkpoint(run)[0] == 6
    with pytest.raises(SystemExit):
        train_gan([*args[:-6], "--run-dir", str(tmp_path / "r2"), "--cls-steps", "0", "--cls-fake", "1"])
    assert "--cls-fake needs the latent classifier (--cls-steps > 0)" in capsys.readouterr().err


def test_generator_kind_is_written_read_and_inferred_for_old_folders(tiny_weights, tmp_path):
    """config.json's "kind" picks the generator class; a folder written before "kind" existed is read by the key
    it has ("gan" or "distilled"); an unknown kind and a damaged weights file are clear errors."""
    import shutil

    from python.models.generators import generator_kind

    folder = tmp_path / "gan"
    shutil.copytree(tiny_weights / "gan", folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["kind"] == "adversarial"
    gen, _ = load_generator(folder)
    z, cond = torch.randn(2, gen.cfg.z_dim), torch.eye(2, 24)
    del cfg["kind"]
    (folder / "config.json").write_text(json.dumps(cfg))
    old, _ = load_generator(folder)
    assert type(old) is type(gen) and torch.equal(old(z, cond), gen(z, cond))
    assert generator_kind({"distilled": {}}) == "distilled" and generator_kind({"gan": {}}) == "adversarial"
    (folder / "config.json").write_text(json.dumps({**cfg, "kind": "diffusion"}))
    with pytest.raises(UserError, match="valid kinds: adversarial, distilled"):
        load_generator(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    weights = folder / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(UserError, match="generator.safetensors: not a readable safetensors file, corrupt or truncated"):
        load_generator(folder)


def test_shipped_gan_path_says_what_it_is():
    from python.models.one_step import OneStep

    gen, cfg = load_generator()
    assert cfg["kind"] == "distilled" and isinstance(gen, OneStep)
