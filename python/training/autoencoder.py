"""What the VAE trainers (train_vae, train_decoder) share: the held-out reconstruction figures and their grid."""
from __future__ import annotations

import numpy as np

from python.data.dataset import to_model_range
from python.models.judge import judge_score
from python.models.vae import VAE, psnr, reconstruct
from python.training.loop import Progress
from python.training.rundir import RunDir


def reconstruction_figures(vae: VAE, images_u8: np.ndarray, labels: np.ndarray | None = None, judge=None) -> dict:
    """PSNR of the reconstructions of `images_u8`; with a judge, its accuracy on the originals and on the
    reconstructions, and their ratio (the judge scores, never trains)."""
    was_training = vae.training
    vae.eval()
    x, rec = to_model_range(images_u8), reconstruct(vae, images_u8)
    vae.train(was_training)
    res = {"psnr": float(psnr(x, rec).mean())}
    if judge is not None:
        res["acc_orig"] = judge_score(judge, x, labels)["accuracy"]
        res["acc_recon"] = judge_score(judge, rec, labels)["accuracy"]
        res["ratio"] = res["acc_recon"] / res["acc_orig"]
    return res


def log_reconstructions(run: RunDir, progress: Progress, step: int, vae: VAE, images_u8: np.ndarray,
                        labels: np.ndarray | None = None, judge=None) -> dict:
    """reconstruction_figures to metrics.jsonl and the progress bar, and samples/recon-<step>.png: the first 16
    originals over their reconstructions."""
    res = reconstruction_figures(vae, images_u8, labels, judge)
    run.metrics(step=step, heldout=res)
    progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
    was_training = vae.training
    vae.eval()
    run.sample_grid("recon", step, reconstruct(vae, images_u8[:16]), reference=to_model_range(images_u8[:16]))
    vae.train(was_training)
    return res
