"""Representation alignment (REPA) for the LDM trainer: the encoder's targets, the denoiser's hidden tokens, the run."""
import json

import pytest
import torch

from python.core.errors import UserError
from python.models.classifier import CountClassifier, LatentClassifier, load_classifier, save_classifier
from python.models.denoiser import Denoiser, DenoiserConfig, load_denoiser
from python.models.vae import vae_digest
from python.train_ldm import main as train_ldm
from python.training.repa import ClassifierTargets, Projector, alignment_loss


def _args(tiny_data, parts, run, *extra):
    return ["--preset", "tiny", "--data", str(tiny_data), "--vae", str(parts / "vae"),
            "--judge", str(parts / "judge" / "checkpoint.pth"), "--run-dir", str(run), *extra]


def _classifier(channels=4, seed=0):
    torch.manual_seed(seed)
    cls = LatentClassifier(channels).eval()
    with torch.no_grad():  # batch-norm statistics away from the identity, so that the maps are not trivial
        for m in cls.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
    return cls


def test_targets_are_the_classifier_stages_on_the_token_grid_standardised():
    cls = _classifier()
    z = torch.randn(6, 4, 16, 16)
    targets = ClassifierTargets(cls, grid=8, first_stage=1)
    assert targets.channels == 96 + 192
    # by hand: stage 1 ends at 8x8 (kept), stage 2 at 4x4 (each cell repeated 2 x 2), in patchify's row-major order
    s1 = cls.features[:12](z)
    s2 = cls.features[12:](s1)
    want = torch.cat([s1, s2.repeat_interleave(2, 2).repeat_interleave(2, 3)], 1).flatten(2).transpose(1, 2)
    torch.testing.assert_close(targets(z), want)
    targets.fit(z)
    f = targets(z).flatten(0, 1)
    torch.testing.assert_close(f.mean(0), torch.zeros(288), atol=1e-4, rtol=0)
    live = want.flatten(0, 1).std(0) > 1e-3  # channels that vary on this sample come out at unit spread
    torch.testing.assert_close(f.std(0)[live], torch.ones(int(live.sum())), atol=1e-3, rtol=0)
    # a 16 x 16 grid: stage 0 kept as is, later stages repeated up
    assert ClassifierTargets(cls, grid=16, first_stage=0)(z).shape == (6, 256, 48 + 96 + 192)
    with pytest.raises(UserError, match="repa-stage"):
        ClassifierTargets(cls, grid=8, first_stage=3)
    with pytest.raises(UserError, match="LatentClassifier"):
        ClassifierTargets(CountClassifier(4), grid=8)


def test_alignment_loss_is_minus_the_cosine():
    a = torch.randn(2, 5, 7)
    assert alignment_loss(a, 3 * a).item() == pytest.approx(-1.0, abs=1e-6)
    assert alignment_loss(a, -a).item() == pytest.approx(1.0, abs=1e-6)
    assert Projector(32, 7)(torch.randn(2, 5, 32)).shape == (2, 5, 7)


def test_denoiser_returns_a_blocks_tokens_from_the_same_pass():
    m = Denoiser(DenoiserConfig(width=32, depth=3, heads=2, pooled=True))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([5, 700]), torch.zeros(2, 24)
    c[0, 3] = c[1, [4, 9]] = 1
    out, hidden = m(x, t, c, feature_layer=1)
    torch.testing.assert_close(out, m(x, t, c))
    torch.testing.assert_close(hidden, m.features(x, t, c, [1])[0])
    assert hidden.shape == (2, 64, 32)


class _Stop(Exception):
    pass


def test_training_with_repa_aligns_resumes_exactly_and_ships_no_projector(tiny_data, parts, tmp_path, monkeypatch):
    save_classifier(_classifier(), tmp_path / "cls", {"vae_sha": vae_digest(parts / "vae")})
    common = ["--no-bf16", "--lr", "3e-3", "--ema", "0", "--eval-every", "20", "--repa-classifier",
              str(tmp_path / "cls")]  # (a metrics line every 20 steps)
    train_ldm(_args(tiny_data, parts, tmp_path / "plain", "--steps", "40", *common))
    train_ldm(_args(tiny_data, parts, tmp_path / "straight", "--steps", "40", "--repa-weight", "2", *common))
    # the same run stopped after its step-20 checkpoint (at its step-40 evaluation), then resumed
    import python.train_ldm as trainer

    probe, calls = trainer.ldm_probe, []

    def stopping_probe(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise _Stop
        return probe(*a, **kw)

    monkeypatch.setattr(trainer, "ldm_probe", stopping_probe)
    with pytest.raises(_Stop):
        train_ldm(_args(tiny_data, parts, tmp_path / "split", "--steps", "40", "--repa-weight", "2", *common))
    monkeypatch.setattr(trainer, "ldm_probe", probe)
    assert (tmp_path / "split" / "latest").read_text().strip() == "ckpt-00000020"
    train_ldm(_args(tiny_data, parts, tmp_path / "split", "--steps", "40", "--repa-weight", "2", "--resume", *common))
    train_ldm(_args(tiny_data, parts, tmp_path / "first", "--steps", "1", "--repa-weight", "2", *common))
    repa = [json.loads(line).get("repa") for run in ("first", "straight")
            for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    repa = [r for r in repa if r is not None]  # the term on the first batch (before any update), at 20, at 40
    assert len(repa) == 3 and repa[-1] < repa[0] - 0.1, repa  # the projected tokens move towards the classifier's maps
    assert not any("repa" in m for m in json.loads("[" + ",".join(
        (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()) + "]"))
    straight, cfg = load_denoiser(tmp_path / "straight" / "final")
    plain = load_denoiser(tmp_path / "plain" / "final")[0]
    split = load_denoiser(tmp_path / "split" / "final")[0]
    assert set(straight.state_dict()) == set(plain.state_dict())  # the projector is not part of the weights
    # the term's gradient reaches the denoiser: same seed and batches as the plain run, different weights
    assert not torch.equal(straight.blocks[0].qkv.weight, plain.blocks[0].qkv.weight)
    # 20 + 20 steps give what 40 give: the projector (a fresh one would steer the denoiser elsewhere) and its Adam state
    # come back from the checkpoint
    for (k, a), b in zip(straight.state_dict().items(), split.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    # under bf16 autocast (how it trains on a GPU) the projector takes the bf16 tokens
    train_ldm(_args(tiny_data, parts, tmp_path / "bf16", "--steps", "1", "--bf16", "--repa-weight", "2",
                    *common[1:]))
    assert "repa" in (tmp_path / "bf16" / "metrics.jsonl").read_text()
    run_cfg = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert run_cfg["repa"]["weight"] == 2 and run_cfg["repa"]["layer"] == 1


def test_repa_options_are_checked_before_a_run_folder_exists(tiny_data, parts, tmp_path):
    save_classifier(_classifier(), tmp_path / "cls", {"vae_sha": vae_digest(parts / "vae")})
    cls = ["--repa-classifier", str(tmp_path / "cls")]
    for bad in (["--repa-weight", "-1"], ["--repa-weight", "1", "--repa-layer", "2", *cls],
                ["--repa-weight", "1", "--repa-stage", "5", *cls], ["--repa-weight", "1"]):  # last: another space
        with pytest.raises(SystemExit):
            train_ldm(_args(tiny_data, parts, tmp_path / "bad", "--steps", "1", *bad))
        assert not (tmp_path / "bad").exists(), bad
    save_classifier(CountClassifier(4), tmp_path / "counter", {"vae_sha": vae_digest(parts / "vae")})
    with pytest.raises(SystemExit):
        train_ldm(_args(tiny_data, parts, tmp_path / "bad", "--steps", "1", "--repa-weight", "1",
                        "--repa-classifier", str(tmp_path / "counter")))
    assert load_classifier(tmp_path / "counter")[1]["output"] == "counts"
