import json

import numpy as np
import pytest
import torch

from python.core.errors import UserError
from python.models.judge import build_judge, save_judge
from python.models.vae import VAE, Decoder, VAEConfig, load_vae, save_vae
from python.train_vae import main as train_vae


@pytest.mark.parametrize("arch", ["gdn", "kl"])
@pytest.mark.parametrize("downsample", [2, 4, 8])
def test_shapes_and_round_trip(arch, downsample, tmp_path):
    cfg = VAEConfig(arch=arch, downsample=downsample, latent_channels=3, channels=[16, 8], kl_channels=[8, 16, 16, 16])
    vae = VAE(cfg).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, *cfg.latent_shape) == (2, 3, 64 // downsample, 64 // downsample)
    assert vae.decode(mean).shape == x.shape
    vae.cfg.scale_factor = 2.5
    save_vae(vae, tmp_path)
    back = load_vae(tmp_path)
    assert back.cfg.scale_factor == 2.5 and torch.equal(back.decode(mean), vae.decode(mean))
    dec = Decoder(back)
    assert torch.allclose(dec(mean * 2.5), vae.decode(mean).clamp(-1, 1), atol=1e-4)


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="no VAE here"):
        load_vae(tmp_path)
    save_vae(VAE(VAEConfig(channels=[16, 8])), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "channels": [32, 8]}))
    with pytest.raises(UserError, match="weights do not match config.json"):
        load_vae(tmp_path)
    with pytest.raises(UserError, match="arch 'vq' unknown"):
        VAEConfig(arch="vq")


def test_train_scale_factor_cache_and_resume(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    train_vae(["--preset", "tiny", "--data", str(tiny_data), "--run-dir", str(run)])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from python.models.vae import encoder_digest
    from python.training.latents import load_latents

    digest = encoder_digest(run / "final")
    cache_files = lambda: sorted((tiny_data / ".cache").glob(f"latents-train-{digest}-*.npz"))  # noqa: E731
    assert len(cache_files()) == 1
    built = cache_files()[0].stat().st_mtime_ns
    lat = load_latents(tiny_data, run / "final")  # reused, not rebuilt
    assert cache_files()[0].stat().st_mtime_ns == built
    mean = lat.mean.float().numpy()
    assert mean.shape == (72, 4, 16, 16) and lat.std.shape == mean.shape and lat.labels.shape == (72, 24)
    assert torch.equal(lat.labels[:36], lat.labels[36:])  # originals, then their mirror images
    # scale factor: 1 / std of the training latents, stored with the weights
    assert res["scale_factor"] == pytest.approx(1 / mean.std(), rel=2e-3)
    vae = load_vae(run / "final")
    assert vae.cfg.scale_factor == pytest.approx(res["scale_factor"]) == lat.scale_factor
    from python.data.dataset import load_split, to_model_range

    imgs = load_split(tiny_data, progress=False).images[:4]
    with torch.no_grad():  # the cache holds what the encoder gives
        assert np.allclose(vae.encode(to_model_range(imgs))[0].numpy(), mean[:4], atol=2e-2)
        assert np.allclose(vae.encode(to_model_range(imgs).flip(3))[0].numpy(), mean[36:40], atol=2e-2)
    z = lat.sample(torch.arange(4), torch.Generator().manual_seed(0))
    assert z.shape == (4, 4, 16, 16)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in lines) == 6

    # resume: a run interrupted at step 3 continues from 3 and ends at the requested total
    run2 = tmp_path / "run2"
    train_vae(["--preset", "tiny", "--data", str(tiny_data), "--run-dir", str(run2), "--steps", "3", "--no-cache"])
    assert (run2 / "latest").read_text().strip() == "ckpt-00000003"
    with pytest.raises(SystemExit):  # a run folder with a checkpoint is not silently overwritten
        train_vae(["--preset", "tiny", "--data", str(tiny_data), "--run-dir", str(run2), "--steps", "6"])
    assert "pass --resume" in capsys.readouterr().err
    train_vae(["--preset", "tiny", "--data", str(tiny_data), "--run-dir", str(run2), "--steps", "6", "--resume", "--no-cache"])
    log = (run2 / "log.txt").read_text()
    assert "resumed at step 3" in log and (run2 / "latest").read_text().strip() == "ckpt-00000006"
    steps = [json.loads(line)["step"] for line in (run2 / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 3, 6, 6]  # (train, eval) at 3 before the interruption, then 6: nothing re-run


def test_eval_vae_prints_one_json_line(tiny_data, tmp_path, capsys):
    from python.eval_vae import main as eval_vae
    from python.models.vae import VAE, VAEConfig, save_vae

    save_vae(VAE(VAEConfig(channels=[16, 8])), tmp_path / "vae")
    save_judge(build_judge("resnet18").eval(), tmp_path / "judge")
    eval_vae(["--data", str(tiny_data), "--vae", str(tmp_path / "vae"), "--judge", str(tmp_path / "judge" / "checkpoint.pth")])
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert len(out) == 1 and res["images"] == 24
    assert {"psnr", "acc_orig", "acc_recon", "decode_images_per_sec", "decoder_mflops"} <= set(res)
    assert res["decode_images_per_sec"] > 0 and res["decoder_mflops"] > 0 and 0 <= res["acc_recon"] <= 1


def test_decoder_only_training_keeps_the_latent_space(tiny_data, parts, tmp_path):
    import json

    from python import train_decoder
    from python.models.vae import vae_digest

    run = tmp_path / "dec"
    args = ["--preset", "tiny", "--data", str(tiny_data), "--vae", str(parts / "vae"), "--run-dir", str(run),
            "--decoder-channels", "24", "12", "--decoder-up", "nearest", "--judge",
            str(parts / "judge" / "judge.safetensors")]
    train_decoder.main(args)
    new, old = load_vae(run / "final"), load_vae(parts / "vae")
    assert vae_digest(run / "final") == vae_digest(parts / "vae")  # same encoder, same scale: same latent space
    assert new.cfg.decoder_channels == [24, 12] and new.cfg.scale_factor == old.cfg.scale_factor
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(new.encode(x)[0], old.encode(x)[0]) and new.decode(new.encode(x)[0]).shape == x.shape
    res = json.loads((run / "final" / "train_result.json").read_text())
    assert {"psnr", "acc_orig", "acc_recon", "ratio"} <= set(res)
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("heldout" in m for m in lines) and all(np.isfinite(m["loss"]) for m in lines if "loss" in m)
    with pytest.raises(SystemExit):  # --init needs matching widths
        train_decoder.main(args[:-4] + ["--init", "--run-dir", str(tmp_path / "dec2")])


def test_decoder_adversarial_term_trains_and_resumes(tiny_data, parts, tmp_path):
    import json

    from python import train_decoder
    from python.models.gan import PatchDiscriminator
    from python.training.losses import adaptive_weight

    w = torch.nn.Parameter(torch.randn(3, 3))
    scale = adaptive_weight((3 * w).sum(), w.sum(), w)  # gradients 3 and 1 everywhere
    assert scale.item() == pytest.approx(3.0)
    assert PatchDiscriminator()(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 8, 8)

    run = tmp_path / "adv"
    args = ["--preset", "tiny", "--data", str(tiny_data), "--vae", str(parts / "vae"), "--run-dir", str(run),
            "--judge", str(parts / "judge" / "judge.safetensors"), "--adv-weight", "0.5", "--adv-start", "2",
            "--steps", "3"]
    train_decoder.main(args)
    train_decoder.main(args[:-2] + ["--steps", "6", "--resume"])
    assert "resumed at step 3" in (run / "log.txt").read_text()
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in lines if "d_loss" in m]
    assert trained and all(np.isfinite(m["d_loss"]) and m["adv_w"] >= 0 for m in trained)
