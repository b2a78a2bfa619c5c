import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small rendered dataset in the official format, shared by the whole session."""
    from python.make_data import make_dataset

    root = tmp_path_factory.mktemp("iclevr")
    make_dataset(root, scenes=12, seed=7, heldout_images=24, heldout_conditions=40, workers=1)
    return root


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A weights folder laid out like weights/ (judge, judge2, vae, ldm, gan, classifier), untrained but perturbed so
    outputs depend on every input: enough to test export and the runtime end to end."""
    import torch

    from python import gan as G
    from python import judge as J
    from python import ldm as L
    from python import vae as V
    from python.diffusion import Schedule
    from python.latents import vae_digest

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    J.save(J.build("resnet18").eval(), root / "judge")
    J.save(J.build("vgg").eval(), root / "judge2")
    vae = V.VAE(V.VAEConfig(channels=[16, 8]))
    vae.cfg.scale_factor = 1.7
    V.save(vae, root / "vae")
    den = L.Denoiser(L.DenoiserConfig(width=32, depth=2, heads=2, pooled=True))
    with torch.no_grad():
        for p in den.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sch = Schedule("cosine", prediction="v_prediction")
    L.save(den, root / "ldm", {"schedule": sch.config(), "vae_sha": vae_digest(root / "vae")})
    gen = G.Generator(G.GANConfig(g_channels=(16, 16, 16), d_channels=(16, 16, 16))).eval()
    G.save(gen, root / "gan", {"vae_sha": vae_digest(root / "vae")})
    from python.train_classifier import save as save_classifier

    cls = G.LatentClassifier(G.GANConfig(latent_channels=vae.cfg.latent_channels)).eval()
    with torch.no_grad():
        for p in cls.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_classifier(cls, root / "classifier", {"vae_sha": vae_digest(root / "vae")})
    return root


@pytest.fixture(scope="session")
def parts(tmp_path_factory) -> Path:
    """A tiny untrained VAE and judge: enough to exercise the LDM and GAN training loops."""
    import torch

    from python import judge as J
    from python import vae as V

    d = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    V.save(V.VAE(V.VAEConfig(channels=[16, 8])), d / "vae")
    J.save(J.build("vgg").eval(), d / "judge")
    return d


@pytest.fixture(scope="session")
def onnx_export(tiny_weights, tmp_path_factory) -> Path:
    """tiny_weights exported to ONNX only: what the torch-free runtime and the server load."""
    from export.to_onnx import export_all

    out = tmp_path_factory.mktemp("onnx_export")
    export_all(tiny_weights, out, formats=("onnx",))
    return out
