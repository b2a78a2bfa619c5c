import json

import pytest
import torch

from python import adversarial
from python.core.diffusion import DEFAULT_APG_NORM, DEFAULT_CLASS_ITERS, DEFAULT_COUNT_WEIGHT
from python.core.errors import UserError
from python.data.dataset import load_condition_file
from python.models.denoiser import load_denoiser
from python.models.generators import load_generator
from python.models.one_step import OneStep


def _args(tiny_data, w, run, *extra):
    return ["--preset", "tiny", "--data", str(tiny_data), "--ldm", str(w / "ldm"), "--vae", str(w / "vae"),
            "--judge", str(w / "judge" / "checkpoint.pth"), "--run-dir", str(run), "--init", "none", *extra]


def test_features_are_the_blocks_outputs_of_the_forward_pass(tiny_weights):
    den, _ = load_denoiser(tiny_weights / "ldm")
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o[0])) for b in den.blocks]  # (patches, tokens)
    x, t, cond = torch.randn(3, 4, 16, 16), torch.tensor([0, 500, 999]), torch.zeros(3, 24)
    cond[0, 3] = cond[1, [1, 7]] = 1
    with torch.no_grad():
        den(x, t, cond)
        feats = den.features(x, t, cond, [0, 1])
    for h in hooks:
        h.remove()
    assert len(feats) == 2 and all(torch.equal(a, b) for a, b in zip(feats, seen))
    with torch.no_grad():  # blocks past the last one asked for are not run
        assert len(den.features(x, t, cond, [0])) == 1


def test_heads_read_the_label_set_and_train_without_touching_the_frozen_ldm(tiny_weights):
    den, _ = load_denoiser(tiny_weights / "ldm")
    before = {k: v.clone() for k, v in den.state_dict().items()}
    disc = adversarial.FeatureDiscriminator(den, [1, 0], width=8)
    assert disc.layers == [0, 1] and not any(k.startswith("backbone") for k in disc.state_dict())
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 10])
    a, b = torch.zeros(2, 24), torch.zeros(2, 24)
    a[:, 2], b[:, 5] = 1, 1
    with torch.no_grad():
        out_a, out_b = disc(x, t, a), disc(x, t, b)
    assert [o.shape for o in out_a] == [(2, 65)] * 2  # 64 tokens and the image
    assert not torch.allclose(out_a[0], out_b[0])  # the same latent under another label set scores differently
    fake = torch.randn(2, 4, 16, 16, requires_grad=True)
    sum(o.mean() for o in disc(fake, t, a)).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0  # the generator's gradient goes through the LDM
    assert all(p.grad is None for p in den.parameters())
    assert all(torch.equal(before[k], v) for k, v in den.state_dict().items())
    with pytest.raises(UserError, match="--d-layers"):
        adversarial.FeatureDiscriminator(den, [den.cfg.depth], width=8)


def test_mismatched_label_sets_are_one_object_off():
    from python.core.labels import COLORS, encode

    sets = [["red cube"], ["red cube", "blue sphere"], ["gray cube", "cyan cylinder", "yellow sphere"]] * 40
    cond = torch.from_numpy(encode_sets(sets, encode)).float()
    wrong = adversarial.mismatched(cond, torch.Generator().manual_seed(0))
    assert torch.equal(cond, torch.from_numpy(encode_sets(sets, encode)).float())  # the input is left alone
    diff = wrong - cond
    kinds = set()
    for i in range(len(cond)):
        added, dropped = (diff[i] > 0).nonzero().flatten().tolist(), (diff[i] < 0).nonzero().flatten().tolist()
        assert set(wrong[i].unique().tolist()) <= {0.0, 1.0} and wrong[i].sum() >= 1
        if added and dropped:  # a swap keeps the colour or the shape of the object it replaces
            (a,), (d,) = added, dropped
            assert a % len(COLORS) == d % len(COLORS) or a // len(COLORS) == d // len(COLORS)
            kinds.add("swap")
        else:
            assert len(added) + len(dropped) == 1  # exactly one object off
            kinds.add("add" if added else "drop")
            if dropped:
                assert cond[i].sum() >= 2  # a one-object set is never emptied
    assert kinds == {"swap", "add", "drop"}


def encode_sets(sets, encode):
    import numpy as np

    return np.stack([encode(s) for s in sets])


def test_trainer_fine_tunes_a_one_step_generator_against_real_latents(tiny_data, tiny_weights, tmp_path, capsys):
    run = tmp_path / "run"
    adversarial.main(_args(tiny_data, tiny_weights, run))
    gen, cfg = load_generator(run / "final")
    assert isinstance(gen, OneStep) and cfg["kind"] == "distilled" and cfg["objective"] == "adversarial"
    assert cfg["discriminator"]["layers"] == [0, 1] and cfg["trained_steps"] == 6
    teacher, _ = load_denoiser(tiny_weights / "ldm")
    moved = [not torch.equal(a, b) for a, b in zip(gen.denoiser.state_dict().values(), teacher.state_dict().values())]
    assert any(moved)  # started as the LDM called once, changed by the adversarial term alone
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "heldout_subset" in r] == [0, 3, 6]  # the start is logged, then each eval
    # with the objects' contrast and edges as ratios to fresh renders of the same conditions
    assert all(0 < r["heldout_subset"]["contrast_ratio"] < 5 and 0 < r["heldout_subset"]["sharpness_ratio"] < 5
               for r in rows if "heldout_subset" in r)
    trained = [r for r in rows if "d_loss" in r]
    assert trained and all(r["d_loss"] >= 0 and "g_adv" in r for r in trained)
    # the tiny preset trains a matching-aware discriminator: real latents under a wrong label set are its fakes too
    assert cfg["discriminator"]["mismatch"] == 1.0 and all(r["d_mismatch"] >= 0 for r in trained)
    # the shipped student (a GAN-kind folder here) is refused with what it is
    with pytest.raises(SystemExit):
        adversarial.main(_args(tiny_data, tiny_weights, tmp_path / "r2")[:-2] + ["--init", str(tiny_weights / "gan")])
    assert "adversarial generator" in capsys.readouterr().err and not (tmp_path / "r2").exists()


def test_side_by_side_puts_real_renders_above_each_generators_samples(tiny_data, tiny_weights, tmp_path):
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import side_by_side

    from python.core.labels import encode, read_json
    from python.data.synthetic import render_conditions

    out = tmp_path / "grid.png"
    w = tiny_weights
    side_by_side.main(["--data", str(tiny_data), "--file", "heldout.json", "--limit", "3", "--gan", str(w / "gan"),
                       "--ldm", str(w / "ldm"), "--vae", str(w / "vae"), "--steps", "2", "--out", str(out)])
    img = np.asarray(Image.open(out))
    assert img.shape == (3 * 66 + 2, side_by_side.LABEL_WIDTH + 3 * 66 + 2, 3)  # real, GAN, LDM rows of 3
    cond = np.stack([encode(x) for x in read_json(tiny_data / "heldout.json")[:3]])
    real = render_conditions(cond, 1)
    x0 = side_by_side.LABEL_WIDTH + 2
    assert np.array_equal(img[2:66, x0:x0 + 64], real[0]) and np.array_equal(img[2:66, x0 + 132:x0 + 196], real[2])
    assert not np.array_equal(img[68:132, x0:x0 + 64], real[0])  # the generator's row is its own
    with pytest.raises(SystemExit):
        side_by_side.main(["--data", str(tiny_data), "--out", str(tmp_path / "none.png")])
    assert not (tmp_path / "none.png").exists()


def test_a_latent_classifiers_stages_can_be_the_discriminators_features(tiny_data, tiny_weights, tmp_path, capsys):
    import shutil

    from python.models.classifier import SHIPPED_CLASSIFIER, load_classifier

    cls, _ = load_classifier(tiny_weights / "classifier")
    feats = adversarial.ClassifierFeatures(cls)
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        out = feats.features(x, None, None, [0, feats.depth - 1])
        logits = cls(x)
    # the last stage's tokens, averaged, are what the classifier's own head reads
    assert out[0].shape == (2, 256, feats.widths[0]) and out[1].shape[2] == feats.widths[-1]
    assert torch.allclose(cls.head(out[1].mean(1)), logits, atol=1e-5)
    # trained end to end with it: the heads are the only trained part of the discriminator, on the stages asked for
    own = tmp_path / "own_classifier"  # not the best-of selector's folder (weights/classifier), which is refused
    shutil.copytree(tiny_weights / "classifier", own)
    run = tmp_path / "run"
    adversarial.main(_args(tiny_data, tiny_weights, run, "--d-features", "classifier", "--d-classifier", str(own),
                           "--d-layers", "1", "5", "--d-t-max", "50"))
    _, cfg = load_generator(run / "final")
    assert cfg["discriminator"]["backbone"] == "classifier" and cfg["discriminator"]["layers"] == [1, 5]
    with pytest.raises(SystemExit):
        adversarial.main(_args(tiny_data, tiny_weights, tmp_path / "r2", "--d-features", "classifier",
                               "--d-classifier", str(SHIPPED_CLASSIFIER), "--d-layers", "1"))
    assert "best-of selector" in capsys.readouterr().err and not (tmp_path / "r2").exists()


def test_heads_warm_start_from_another_run_of_the_same_discriminator(tiny_data, tiny_weights, tmp_path, capsys):
    from safetensors.torch import load_file

    from python.training.rundir import load_checkpoint

    first = tmp_path / "first"
    adversarial.main(_args(tiny_data, tiny_weights, first))
    _, theirs, _ = load_checkpoint(first)
    # with a zero learning rate for the heads, the second run's heads are exactly the first run's last ones
    second = tmp_path / "second"
    adversarial.main(_args(tiny_data, tiny_weights, second, "--init-disc", str(first), "--d-lr", "0"))
    _, ours, _ = load_checkpoint(second)
    assert theirs["disc"].keys() == ours["disc"].keys()
    assert all(torch.equal(theirs["disc"][k], ours["disc"][k]) for k in ours["disc"])
    assert "warm-started from" in (second / "log.txt").read_text()
    # a checkpoint folder works too; a different discriminator (other blocks) is refused before anything trains
    ckpt = sorted(first.glob("ckpt-*"))[0]
    assert load_file(str(ckpt / "disc.safetensors"))
    with pytest.raises(SystemExit):
        adversarial.main(_args(tiny_data, tiny_weights, tmp_path / "r3", "--init-disc", str(ckpt),
                               "--d-layers", "1"))
    err = capsys.readouterr().err
    assert "is not this run's" in err and "layers" in err and not (tmp_path / "r3").exists()
    with pytest.raises(SystemExit):
        adversarial.main(_args(tiny_data, tiny_weights, tmp_path / "r4", "--init-disc", str(tmp_path)))
    assert "not a python.adversarial run folder" in capsys.readouterr().err


def test_dmd_moves_each_latent_along_the_fake_minus_the_guided_real_prediction(tiny_weights):
    import copy

    from python.core.diffusion import Schedule, add_noise, guide, guide_projected, x0_eps
    from python.training.losses import coeff_tables

    teacher, tcfg = load_denoiser(tiny_weights / "ldm")
    schedule = Schedule(**tcfg["schedule"])
    tables = coeff_tables(schedule)
    cond = torch.zeros(3, 24)
    cond[0, 1] = cond[1, [2, 9]] = cond[2, [0, 5, 17]] = 1
    fake = torch.randn(3, 4, 16, 16, requires_grad=True)

    def grad_of(fake_score, guidance):
        fake.grad = None
        loss = adversarial.dmd_loss(fake, cond, teacher, fake_score, guidance, (100, 900), tables, schedule.prediction,
                                    torch.Generator().manual_seed(3))
        loss.backward()
        return fake.grad.clone()

    # a fake score equal to the unguided LDM: the two scores agree, nothing moves
    assert grad_of(teacher, 1.0).abs().max() < 1e-6
    # another fake score: the gradient is (fake x0 - guided real x0) / per-sample mean |latent - real x0| / numel,
    # recomputed here from the same noise draws
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = grad_of(other, 2.0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        t = torch.randint(100, 900, (3,), generator=gen)
        ca, cs = tables[0][t], tables[1][t]
        x_t = add_noise(fake, torch.randn(fake.shape, generator=gen), ca, cs)
        real = x0_eps(x_t, guide(teacher(x_t, t, cond), teacher(x_t, t, torch.zeros_like(cond)), 2.0), ca, cs,
                      schedule.prediction)[0]
        mine = x0_eps(x_t, other(x_t, t, cond), ca, cs, schedule.prediction)[0]
        want = (mine - real) / (fake - real).abs().mean((1, 2, 3), keepdim=True) / fake.numel()
    assert g.abs().max() > 0 and torch.allclose(g, want, atol=1e-6 * want.abs().max().item(), rtol=1e-3)
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in other.parameters())
    # with adaptive projected guidance the real prediction is the projected guidance of the two x_0 predictions
    fake.grad = None
    adversarial.dmd_loss(fake, cond, teacher, other, 2.0, (100, 900), tables, schedule.prediction,
                         torch.Generator().manual_seed(3), apg_norm=1.5).backward()
    with torch.no_grad():
        real = guide_projected(x0_eps(x_t, teacher(x_t, t, cond), ca, cs, schedule.prediction)[0],
                               x0_eps(x_t, teacher(x_t, t, torch.zeros_like(cond)), ca, cs, schedule.prediction)[0],
                               2.0, 1.5)
        want = (mine - real) / (fake - real).abs().mean((1, 2, 3), keepdim=True) / fake.numel()
    assert torch.allclose(fake.grad, want, atol=1e-6 * want.abs().max().item(), rtol=1e-3)
    assert not torch.allclose(fake.grad, g, rtol=1e-2)
    # with classifier guidance the (classifier-free) real prediction is then moved down the guidance classifier's
    # gradient, three descent steps each taken where the last left it: the deployed sampler's guidance
    from python.models.classifier import load_class_grad

    class_grad = load_class_grad(tiny_weights / "guide", tiny_weights / "vae")
    fake.grad = None
    adversarial.dmd_loss(fake, cond, teacher, other, 2.0, (100, 900), tables, schedule.prediction,
                         torch.Generator().manual_seed(3), class_grad=class_grad, class_scale=4.0,
                         class_iters=3).backward()
    with torch.no_grad():
        real = x0_eps(x_t, guide(teacher(x_t, t, cond), teacher(x_t, t, torch.zeros_like(cond)), 2.0), ca, cs,
                      schedule.prediction)[0]
        for _ in range(3):
            real = real - 4.0 * class_grad(real, cond)
        want = (mine - real) / (fake - real).abs().mean((1, 2, 3), keepdim=True) / fake.numel()
    assert torch.allclose(fake.grad, want, atol=1e-6 * want.abs().max().item(), rtol=1e-3)
    assert not torch.allclose(fake.grad, g, rtol=1e-2)


def test_trainer_runs_distribution_matching_alone_and_resumes_only_with_it(tiny_data, tiny_weights, tmp_path, capsys):
    from python.training.rundir import load_checkpoint

    run = tmp_path / "run"
    adversarial.main(_args(tiny_data, tiny_weights, run, "--adv-weight", "0", "--dmd-weight", "1",
                           "--dmd-guidance", "2", "--dmd-t-range", "50", "950"))
    gen, cfg = load_generator(run / "final")
    assert cfg["objective"] == "dmd" and cfg["discriminator"] is None
    # the teacher guided as the LDM samples by default (adaptive projected), recorded with the run
    assert cfg["dmd"] == {"guidance": 2.0, "t_range": [50, 950], "fake_lr": 1e-4, "apg_norm": DEFAULT_APG_NORM}
    teacher, _ = load_denoiser(tiny_weights / "ldm")
    _, state, _ = load_checkpoint(run)
    assert "disc" not in state and "fake_score" in state  # no heads trained; the fake score is checkpointed
    assert any(not torch.equal(a, state["fake_score"][k]) for k, a in teacher.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(gen.denoiser.state_dict().values(),
                                                     teacher.state_dict().values()))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "f_loss" in r]
    assert trained and all(r["f_loss"] >= 0 for r in trained) and any("g_dmd" in r for r in trained)
    assert not any("d_loss" in r for r in rows)
    # shipped, the weights folder says what trained it
    from python import ship

    ship.main(["gan", "--run", str(run), "--out", str(tmp_path / "shipped")])
    _, shipped = load_generator(tmp_path / "shipped")
    assert shipped["objective"] == "dmd" and shipped["dmd"]["guidance"] == 2.0 and "discriminator" not in shipped
    # a resume that changes the distribution matching is refused; nothing at all to train against is refused
    with pytest.raises(SystemExit):
        adversarial.main(_args(tiny_data, tiny_weights, run, "--adv-weight", "0", "--dmd-weight", "1",
                               "--dmd-guidance", "3", "--dmd-t-range", "50", "950", "--resume", "--steps", "8"))
    assert "--resume with settings that change the run" in capsys.readouterr().err
    # the teacher with the deployed sampler's classifier guidance, recorded with the run
    guided = tmp_path / "guided"
    adversarial.main(_args(tiny_data, tiny_weights, guided, "--adv-weight", "0", "--dmd-weight", "1",
                           "--dmd-class-scale", "2", "--dmd-guide", str(tiny_weights / "guide")))
    _, cfg = load_generator(guided / "final")
    assert {k: cfg["dmd"][k] for k in ("class_scale", "class_iters", "count_weight")} == {
        "class_scale": 2.0, "class_iters": DEFAULT_CLASS_ITERS, "count_weight": DEFAULT_COUNT_WEIGHT}
    for bad, msg in ((["--adv-weight", "0"], "no objective"), (["--dmd-weight", "1", "--dmd-t-range", "900", "100"],
                                                               "--dmd-t-range"),
                     (["--dmd-class-scale", "1"], "--dmd-weight 0 does not use"),
                     (["--dmd-weight", "1", "--dmd-class-scale", "-1"], "--dmd-class-scale must be"),
                     (["--dmd-weight", "1", "--dmd-class-scale", "1", "--dmd-class-iters", "0"],
                      "--dmd-class-iters must be")):
        with pytest.raises(SystemExit):
            adversarial.main(_args(tiny_data, tiny_weights, tmp_path / "bad", *bad))
        assert msg in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_shipped_weights_record_the_chain_of_warm_starts_they_came_from(tiny_data, tiny_weights, tmp_path):
    """A run warm-started from a weights folder records where it began (the folder, its checksums and the provenance
    that folder carries); shipping carries it, nested back to the first run; a resumed run keeps what it began from
    even after that folder was replaced, as weights/gan is each time a run ships."""
    from python import ship
    from python.models.weights import lineage

    first, second, w = tmp_path / "first", tmp_path / "second", tmp_path / "w"
    adversarial.main(_args(tiny_data, tiny_weights, first, "--adv-weight", "0", "--dmd-weight", "1"))
    ship.main(["gan", "--run", str(first), "--out", str(w)])
    _, w_cfg = load_generator(w)
    assert "init_from" not in w_cfg  # began from the LDM itself (--init none)
    args = _args(tiny_data, tiny_weights, second, "--adv-weight", "0", "--dmd-weight", "1")
    args[args.index("--init") + 1] = str(w)
    adversarial.main(args)
    ship.main(["gan", "--run", str(second), "--out", str(tmp_path / "w2")])
    _, w2_cfg = load_generator(tmp_path / "w2")
    began = w2_cfg["init_from"]
    assert began["path"] == str(w.resolve()) and began["sha256"] == w_cfg["sha256"]
    assert began["run"] == str(first.resolve()) and began["trained_steps"] == w_cfg["trained_steps"]
    assert lineage(tmp_path / "w2")["init_from"] == began  # a third run from w2 reads back to the first
    ship.main(["gan", "--run", str(second), "--out", str(w), "--force"])  # the folder it began from, replaced
    assert load_generator(w)[1]["sha256"] != began["sha256"]
    adversarial.main(args + ["--resume", "--steps", "8"])
    assert json.loads((second / "config.json").read_text())["init_from"] == began
    assert load_generator(second / "final")[1]["init_from"] == began


def test_trainer_runs_the_gan_loss_beside_distribution_matching_and_ships_both(tiny_data, tiny_weights, tmp_path,
                                                                                capsys):
    """The shipped GAN path's recipe (DMD2): heads on real latents and an online fake score in one run. Both critics
    train and are checkpointed, the generator's log carries both terms, and the shipped folder records both
    settings; a resume that changes the heads is refused, one that changes only the GAN term's weight is logged."""
    from python import ship
    from python.training.rundir import load_checkpoint

    run = tmp_path / "run"
    adversarial.main(_args(tiny_data, tiny_weights, run, "--adv-weight", "0.1", "--mismatch", "0",
                           "--dmd-weight", "1", "--dmd-guidance", "2"))
    _, state, _ = load_checkpoint(run)
    assert "disc" in state and "fake_score" in state
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    generator_rows = [r for r in rows if "g_dmd" in r]
    assert generator_rows and all("g_adv" in r and "d_loss" in r and "f_loss" in r for r in generator_rows)
    ship.main(["gan", "--run", str(run), "--out", str(tmp_path / "shipped")])
    _, cfg = load_generator(tmp_path / "shipped")
    assert cfg["kind"] == "distilled" and cfg["objective"] == "adversarial+dmd"
    assert cfg["dmd"]["guidance"] == 2.0 and cfg["discriminator"]["mismatch"] == 0.0
    with pytest.raises(SystemExit):
        adversarial.main(_args(tiny_data, tiny_weights, run, "--adv-weight", "0.1", "--mismatch", "1",
                               "--dmd-weight", "1", "--dmd-guidance", "2", "--resume", "--steps", "8"))
    assert "--resume with settings that change the run" in capsys.readouterr().err
    adversarial.main(_args(tiny_data, tiny_weights, run, "--adv-weight", "0.5", "--mismatch", "0",
                           "--dmd-weight", "1", "--dmd-guidance", "2", "--resume", "--steps", "8"))
    assert "'adv_weight': (0.1, 0.5)" in (run / "log.txt").read_text()
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 8


def test_count_term_trains_the_generator_towards_the_requested_number_of_objects(tiny_data, tiny_weights, tmp_path,
                                                                                  capsys):
    """--count-weight alone beside distribution matching (whose weight is 0 here, so the count term is the only
    gradient the generator sees): the counter's cross-entropy on fixed noise falls; the run logs it, records the
    counter in the shipped config, and refuses a resume that changes it."""
    from python.models.classifier import CountClassifier, load_classifier, save_classifier
    from python.models.sampling import gan_latents
    from python.models.vae import load_vae, vae_digest
    from python.training.losses import count_reward

    torch.manual_seed(3)
    net = CountClassifier(load_vae(tiny_weights / "vae").cfg.latent_channels)
    with torch.no_grad():  # an untrained counter reads everything alike; perturbed, it has gradients to follow
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    counter = tmp_path / "counter"
    save_classifier(net.eval(), counter, {"vae_sha": vae_digest(tiny_weights / "vae")})
    net = load_classifier(counter)[0]
    cond = torch.zeros(8, 24)
    for i in range(8):
        cond[i, [i, (i * 5 + 3) % 24]] = 1

    def ce(gen):
        with torch.no_grad():
            return count_reward(net, gan_latents(gen, cond.numpy(), seed=11), cond, present=0, absent=0).item()

    run = tmp_path / "run"
    args = ("--adv-weight", "0", "--dmd-weight", "1e-9", "--count-weight", "1", "--counter", str(counter),
            "--lr", "3e-3", "--ema", "0", "--steps", "8", "--eval-every", "8", "--save-every", "8")
    teacher, tcfg = load_denoiser(tiny_weights / "ldm")
    before = ce(adversarial._student(None, teacher, tcfg, tiny_weights / "vae").eval())
    adversarial.main(_args(tiny_data, tiny_weights, run, *args))
    gen, cfg = load_generator(run / "final")
    assert ce(gen) < before - 1e-3
    assert cfg["count_term"] == {"weight": 1.0, "counter": str(counter)}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("count" in r for r in rows)
    assert 0 <= [r for r in rows if "heldout_subset" in r][-1]["heldout_subset"]["counter_surplus"] <= 1
    with pytest.raises(SystemExit):
        adversarial.main(_args(tiny_data, tiny_weights, run, *args[:5], "0.5", *args[6:], "--resume", "--steps", "9"))
    assert "--resume with settings that change the run" in capsys.readouterr().err
    for bad, msg in ((["--count-weight", "1"], "needs --counter"), (["--count-weight", "-1"], "--count-weight")):
        with pytest.raises(SystemExit):
            adversarial.main(_args(tiny_data, tiny_weights, tmp_path / "bad", "--adv-weight", "0", "--dmd-weight", "1",
                                   *bad))
        assert msg in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_eval_data_sets_the_probe_the_log_reads(tiny_data, tiny_weights, tmp_path, capsys):
    """--eval-data: the held-out conditions of the log come from that folder, not --data (here two 3-object
    conditions; the tiny set's own heldout.json holds other sizes), so runs on different training sets share a probe;
    a folder without heldout.json is refused before any run folder is made."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "heldout.json").write_text(json.dumps([["red sphere", "blue cube", "gray cylinder"]] * 2))
    run = tmp_path / "run"
    adversarial.main(_args(tiny_data, tiny_weights, run, "--steps", "1", "--eval-every", "1",
                           "--eval-data", str(probe)))
    evals = [json.loads(line)["heldout_subset"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "heldout_subset" in line]
    assert evals and all(set(e["by_objects"]) == {"3"} for e in evals)
    own = load_condition_file(tiny_data, "heldout.json")[:4].sum(1)  # what the log would read without the option
    assert set(own.tolist()) != {3.0}
    with pytest.raises(SystemExit):
        adversarial.main(_args(tiny_data, tiny_weights, tmp_path / "bad", "--steps", "1",
                               "--eval-data", str(tmp_path / "nowhere")))
    assert "heldout.json" in capsys.readouterr().err and not (tmp_path / "bad").exists()
