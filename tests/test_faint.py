"""Renders with one half-transparent object (render_faint_arrays) and the latent classifier that learns to call such
a ghost absent (train_classifier --faint): the class term's classifier for a one-step generator that must draw
solid objects, not faint ones."""
import json

import numpy as np
import pytest

from python.core.errors import UserError
from python.data.synthetic import render_faint_arrays


def test_faint_renders_blend_exactly_one_unlabelled_object_at_its_opacity():
    images, solid, faint, alpha = render_faint_arrays(5, 6, lo=1, hi=2, workers=1)
    assert images.shape[1:] == (64, 64, 3) and images.dtype == np.uint8 and len(images) >= 4
    assert (faint.sum(1) == 1).all() and ((solid + faint) <= 1).all()  # the ghost's class is not a solid one
    assert ((1 <= solid.sum(1)) & (solid.sum(1) <= 2)).all()
    assert ((0.1 <= alpha) & (alpha <= 0.5)).all()
    again = render_faint_arrays(5, 6, lo=1, hi=2, workers=1)
    assert all(np.array_equal(a, b) for a, b in zip((images, solid, faint, alpha), again))
    # the same scenes at fixed opacities: the image moves linearly from the scene without the ghost towards the
    # scene with it (blending, not a different render), and the ghost is really in the picture
    at = {a: render_faint_arrays(5, 6, lo=1, hi=2, alpha=(a, a), workers=1)[0].astype(np.float32)
          for a in (0.2, 0.5, 0.8)}
    step1, step2 = at[0.5] - at[0.2], at[0.8] - at[0.5]
    assert np.abs(step1 - step2).max() <= 3 and np.abs(step1).reshape(len(step1), -1).max(1).min() > 10
    with pytest.raises(UserError, match="lo <= hi"):
        render_faint_arrays(0, 2, lo=3, hi=2)
    with pytest.raises(UserError, match="opacities"):
        render_faint_arrays(0, 2, alpha=(0.5, 1.0))


def test_train_classifier_faint_trains_on_ghosts_labelled_absent_and_reports_them(tiny_data, parts, tmp_path):
    from python.models.classifier import load_classifier_for
    from python.train_classifier import main

    run, out = tmp_path / "run", tmp_path / "weights"
    args = ["--data", str(tiny_data), "--vae", str(parts / "vae"), "--run-dir", str(run), "--steps", "3",
            "--batch", "8", "--faint", "24", "--workers", "1", "--out", str(out)]
    main(args)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["faint_scenes"] == 24 and 0 <= cfg["faint_called_present"] <= 1
    assert 0 <= cfg["solid_beside_faint_found"] <= 1
    stored = np.load(run / "faint-latents.npz")
    assert stored["labels"].shape == stored["faint"].shape and (stored["faint"].sum(1) == 1).all()
    assert "faint object called present" in (run / "log.txt").read_text()
    assert load_classifier_for(out, parts / "vae") is not None  # a label classifier, as the class terms load
    main(args)  # a rerun reuses the renders and the trained classifier
    assert "faint scenes' latents read from" in (run / "log.txt").read_text()
    with pytest.raises(SystemExit):  # the renders of another scene count are not silently mixed in
        main([*args[:-5], "--faint", "30", "--workers", "1", "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["--counts", "30", "--faint", "30", "--run-dir", str(tmp_path / "bad")])
