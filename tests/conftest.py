import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small rendered dataset in the official format, shared by the whole session."""
    from python.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("iclevr")
    make_dataset(root, scenes=12, seed=7, heldout_images=24, heldout_conditions=40, workers=1)
    return root


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A weights folder laid out like weights/ (judge, judge2, vae, ldm, gan, classifier, counter), untrained but perturbed so
    outputs depend on every input: enough to test export and the runtime end to end."""
    import torch

    from python.core.diffusion import Schedule
    from python.models.classifier import LatentClassifier
    from python.models.denoiser import Denoiser, DenoiserConfig, save_denoiser
    from python.models.gan import GANConfig, Generator
    from python.models.generators import save_generator
    from python.models.judge import build_judge, save_judge
    from python.models.vae import VAE, VAEConfig, save_vae, vae_digest

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    save_judge(build_judge("resnet18").eval(), root / "judge")
    save_judge(build_judge("vgg").eval(), root / "judge2")
    vae = VAE(VAEConfig(channels=[16, 8]))
    vae.cfg.scale_factor = 1.7
    save_vae(vae, root / "vae")
    den = Denoiser(DenoiserConfig(width=32, depth=2, heads=2, pooled=True))
    with torch.no_grad():
        for p in den.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sch = Schedule("cosine", prediction="v_prediction")
    save_denoiser(den, root / "ldm", {"schedule": sch.config(), "vae_sha": vae_digest(root / "vae")})
    gen = Generator(GANConfig(g_channels=(16, 16, 16), d_channels=(16, 16, 16))).eval()
    save_generator(gen, root / "gan", {"vae_sha": vae_digest(root / "vae")})
    from python.models.classifier import save_classifier

    cls = LatentClassifier(vae.cfg.latent_channels).eval()
    with torch.no_grad():
        for p in cls.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_classifier(cls, root / "classifier", {"vae_sha": vae_digest(root / "vae")})
    guide = LatentClassifier(vae.cfg.latent_channels).eval()  # the LDM's classifier guidance: not the best-of one
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_classifier(guide, root / "guide", {"vae_sha": vae_digest(root / "vae")})
    from python.models.classifier import total_counter

    total = total_counter(vae.cfg.latent_channels, widths=(8, 8, 16)).eval()  # the guidance's count term
    with torch.no_grad():
        for p in total.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_classifier(total, root / "guide" / "counter", {"vae_sha": vae_digest(root / "vae")})
    from python.models.counter import ImageCounter, save_counter

    counter = ImageCounter(widths=(8, 8, 8, 8)).eval()
    with torch.no_grad():
        for p in counter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_counter(counter, root / "counter", {})
    return root


@pytest.fixture(scope="session")
def parts(tmp_path_factory) -> Path:
    """A tiny untrained VAE and judge: enough to exercise the LDM and GAN training loops."""
    import torch

    from python.models.judge import build_judge, save_judge
    from python.models.vae import VAE, VAEConfig, save_vae

    d = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    save_vae(VAE(VAEConfig(channels=[16, 8])), d / "vae")
    save_judge(build_judge("vgg").eval(), d / "judge")
    return d


@pytest.fixture(scope="session")
def onnx_export(tiny_weights, tmp_path_factory) -> Path:
    """tiny_weights exported to ONNX only: what the torch-free runtime and the server load."""
    from export.to_onnx import export_all

    out = tmp_path_factory.mktemp("onnx_export")
    export_all(tiny_weights, out, formats=("onnx",))
    return out


@pytest.fixture
def ddim_spacing(monkeypatch):
    """ddim_spacing("leading"): the shared samplers' "ddim" walks that spacing for the rest of the test (no command-line
    option chooses it in Python; the C++ sampler's --spacing and the regression fixture's old images need it)."""
    from python.core import diffusion, sampling

    make = sampling.make_sampler

    def use(spacing: str):
        monkeypatch.setattr(sampling, "make_sampler", lambda name, sch, n, eta=0.0: diffusion.DDIM(sch, n, eta, spacing)
                            if name == "ddim" else make(name, sch, n, eta))
    return use


@pytest.fixture(scope="session")
def layout_bank():
    """A small placement prior (python/core/layout.py): 6 renderer scenes of each count 1-3."""
    from python.data.layout import make_bank

    return make_bank(per_count=6, max_objects=3, seed=2, workers=1)


@pytest.fixture(scope="session")
def layout_export(tiny_weights, layout_bank, tmp_path_factory):
    """(weights, export): tiny_weights with a layout denoiser (perturbed, so that the places show) in ldm/ and a
    layout one-step student in gan/ (its own prior, drawn with another seed: the export must keep the two apart),
    exported to ONNX and TorchScript."""
    import torch

    from export.to_onnx import export_all
    from python.data.layout import make_bank
    from python.models.denoiser import Denoiser, DenoiserConfig, load_denoiser, save_denoiser
    from python.models.generators import save_generator
    from python.models.one_step import OneStep

    root = tmp_path_factory.mktemp("layout_weights")
    for sub in tiny_weights.iterdir():
        if sub.name not in ("ldm", "gan"):
            (root / sub.name).symlink_to(sub)
    _, cfg = load_denoiser(tiny_weights / "ldm")
    torch.manual_seed(1)
    den = Denoiser(DenoiserConfig(width=32, depth=2, heads=2, layout=True))
    with torch.no_grad():
        for p in den.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    den.layout_bank = layout_bank
    save_denoiser(den, root / "ldm", {k: cfg[k] for k in ("schedule", "vae_sha")})
    gen = OneStep(den.cfg, cfg["schedule"])
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    gen.layout_bank = make_bank(per_count=5, max_objects=3, seed=3, workers=1)
    save_generator(gen.eval(), root / "gan", {"vae_sha": cfg["vae_sha"]})
    out = tmp_path_factory.mktemp("layout_export")
    export_all(root, out, formats=("onnx", "torchscript"))
    return root, out
