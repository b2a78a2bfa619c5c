"""The trainers' shared scaffold: checkpoint / restore by name, settings resolved from a preset, schedules."""
import argparse

import pytest
import torch

from python.core.errors import UserError
from python.training.loop import resolve_config
from python.training.rundir import RunDir, restore_checkpoint
from python.training.schedules import warmup_cosine


def _parts(seed: int):
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    sched = warmup_cosine(opt, 10, warmup=2, floor=0.1)
    gen = torch.Generator().manual_seed(seed)
    return net, opt, sched, gen


def test_checkpoint_then_restore_gives_back_weights_states_and_random_stream(tmp_path):
    run = RunDir(tmp_path / "run", {"x": 1})
    net, opt, sched, gen = _parts(0)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    torch.randn(5, generator=gen)
    run.checkpoint(7, {"model": net, "unused": None}, {"opt": opt, "sched": sched, "gen": gen})
    state_after = gen.get_state()

    net2, opt2, sched2, gen2 = _parts(1)
    assert restore_checkpoint(tmp_path / "run", {"model": net2}, {"opt": opt2, "sched": sched2, "gen": gen2}) == 7
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    assert sched2.last_epoch == sched.last_epoch and opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert torch.equal(gen2.get_state(), state_after)
    assert torch.equal(torch.randn(3, generator=gen2), torch.randn(3, generator=gen))


def test_restore_names_what_the_checkpoint_lacks_unless_optional(tmp_path):
    run = RunDir(tmp_path / "run", {})
    net, opt, _, _ = _parts(0)
    run.checkpoint(3, {"model": net}, {"opt": opt})
    disc = torch.nn.Linear(2, 1)
    with pytest.raises(UserError, match="its checkpoint has no 'disc'"):
        restore_checkpoint(run.path, {"model": net, "disc": disc}, {"opt": opt})
    before = disc.weight.detach().clone()
    assert restore_checkpoint(run.path, {"model": net, "disc": disc}, {"opt": opt}, optional=("disc",)) == 3
    assert torch.equal(disc.weight, before)  # left as it was: a part added on resume starts afresh
    assert restore_checkpoint(tmp_path / "empty", {"model": net}, {}) == 0


def test_resolve_config_overrides_the_preset_with_given_options_only(tmp_path):
    args = argparse.Namespace(steps=None, lr=0.5, run_dir=tmp_path)
    assert resolve_config({"steps": 6, "lr": 1e-3}, args) == {"steps": 6, "lr": 0.5, "run_dir": str(tmp_path)}


def test_warmup_cosine_warms_up_decays_and_holds_its_floor():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, 100, warmup=4, floor=0.1)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.25) and lrs[3] == pytest.approx(1.0, abs=0.01)
    assert lrs[100] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert warmup_cosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 100).lr_lambdas[0](0) == 0.5


def test_resume_refuses_changed_settings_that_define_the_run_before_writing(tmp_path):
    RunDir(tmp_path / "run", {"width": 128, "lr": 4e-4, "steps": 100})
    with pytest.raises(UserError, match=r"width was 128, now 192; lr was 0.0004, now 0.001"):
        RunDir(tmp_path / "run", {"width": 192, "lr": 1e-3, "steps": 100}, resume=True, fixed=("width", "lr"))
    assert '"width": 128' in (tmp_path / "run" / "config.json").read_text()  # nothing written
    RunDir(tmp_path / "run", {"width": 128, "lr": 4e-4, "steps": 200}, resume=True, fixed=("width", "lr"))
    assert "resuming with changed settings: {'steps': (100, 200)}" in (tmp_path / "run" / "log.txt").read_text()


def test_two_checkpoints_kept_and_a_damaged_newest_falls_back_to_the_one_before(tmp_path, capsys):
    run = RunDir(tmp_path / "run", {})
    net, opt, _, _ = _parts(0)
    for step in (1, 2, 3):
        with torch.no_grad():
            net.weight.fill_(step)
        run.checkpoint(step, {"model": net}, {"opt": opt})
    assert sorted(p.name for p in run.path.glob("ckpt-*")) == ["ckpt-00000002", "ckpt-00000003"]
    weights = run.path / "ckpt-00000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # the newest one damaged after it was written
    assert restore_checkpoint(run.path, {"model": net}, {"opt": opt}) == 2
    assert torch.all(net.weight == 2) and "ckpt-00000003 does not load" in capsys.readouterr().out
    (run.path / "ckpt-00000002" / "state.pt").write_bytes(b"")
    with pytest.raises(UserError, match="no checkpoint loads"):
        restore_checkpoint(run.path, {"model": net}, {"opt": opt})
