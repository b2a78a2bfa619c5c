"""The Triton repository cannot be served here (no Triton); its structure is checked against the ONNX graphs,
and the Python-backend sampler is run against a stand-in for triton_python_backend_utils that answers its
BLS calls with ONNX Runtime, then compared with the project's runtime."""
import importlib.util
import json
import re
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest

from export.triton_repo import io_of, write_repository
from python.core.diffusion import DEFAULT_CLASS_ITERS
from python.core.errors import UserError
from python.core.labels import encode
from python.core.layout import GENERATOR_BANK_FILE
from runtime.generate import Pipeline
from runtime.models import ExportFolder


@pytest.fixture(scope="module")
def repo(onnx_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton")
    return out, write_repository(onnx_export, out)


def test_layout_and_configs_match_the_onnx_graphs(repo, onnx_export):
    out, names = repo
    assert names == ["judge", "judge2", "decoder", "denoiser", "generator", "class_grad", "ldm", "gan"]
    manifest = json.loads((onnx_export / "manifest.json").read_text())["models"]
    for name in names:
        cfg = (out / name / "config.pbtxt").read_text()
        assert re.search(rf'^name: "{name}"$', cfg, re.M), name
        assert "max_batch_size: 256" in cfg and (out / name / "1").is_dir()
        if name in manifest:
            model = out / name / "1" / "model.onnx"
            assert model.read_bytes() == (onnx_export / manifest[name]["file"]).read_bytes()
            assert 'platform: "onnxruntime_onnx"' in cfg and "dynamic_batching" in cfg
            inputs, outputs = io_of(model)
            for tname, ttype, dims in inputs + outputs:  # every graph tensor declared with its type
                assert re.search(rf'name: "{tname}", data_type: {ttype}', cfg), (name, tname)
    assert 'reshape: { shape: [  ] }' in (out / "denoiser" / "config.pbtxt").read_text()  # per-sample t
    gan = (out / "gan" / "config.pbtxt").read_text()
    assert 'platform: "ensemble"' in gan and gan.index('"generator"') < gan.index('"decoder"')
    for f in ("model.py", "core/diffusion.py", "core/noise.py", "core/sampling.py"):
        compile((out / "ldm" / "1" / f).read_text(), f, "exec")


def _fake_pb_utils(repo_dir):
    """Enough of triton_python_backend_utils for model.py: tensors, responses, and BLS via ONNX Runtime."""
    m = types.ModuleType("triton_python_backend_utils")
    sessions = {}

    class Tensor:
        def __init__(self, name, array):
            self._name, self._a = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._a

    class Response:
        def __init__(self, output_tensors=None, error=None):
            self.outputs, self._error = output_tensors or [], error

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    class Request:
        def __init__(self, model_name, requested_output_names, inputs):
            self.model, self.names, self.inputs = model_name, requested_output_names, inputs

        def exec(self):
            if self.model not in sessions:
                sessions[self.model] = ort.InferenceSession(str(repo_dir / self.model / "1" / "model.onnx"))
            feeds = {t.name(): t.as_numpy() for t in self.inputs}
            if self.model == "denoiser":  # what the config's reshape does to t
                feeds["t"] = feeds["t"].reshape(-1)
            outs = sessions[self.model].run(self.names, feeds)
            return Response([Tensor(n, o) for n, o in zip(self.names, outs)])

    class TritonError:
        def __init__(self, msg):
            self._msg = msg

        def message(self):
            return self._msg

    m.Tensor, m.InferenceRequest, m.InferenceResponse, m.TritonError = Tensor, Request, Response, TritonError
    m.TritonModelException = RuntimeError
    m.get_input_tensor_by_name = lambda r, n: next((t for t in r.inputs if t.name() == n), None)
    m.get_output_tensor_by_name = lambda r, n: next((t for t in r.outputs if t.name() == n), None)
    return m


def _pbtxt_parameters(text):
    return {k: {"string_value": json.loads(f'"{v}"') if k == "manifest" else v}
            for k, v in re.findall(r'key: "(\w+)", value: \{ string_value: "((?:[^"\\]|\\.)*)" \}', text)}


def _python_backend(out, name, monkeypatch):
    """(model, pb_utils stand-in): repository `out`'s Python-backend model `name`, loaded and initialised with the
    parameters of its config.pbtxt."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils(out))
    monkeypatch.syspath_prepend(str(out / name / "1"))
    spec = importlib.util.spec_from_file_location(f"triton_{name}_model_{out.name}", out / name / "1" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"parameters": _pbtxt_parameters(
        (out / name / "config.pbtxt").read_text())})})
    return model, sys.modules["triton_python_backend_utils"]


def test_python_backend_sampler_matches_the_runtime(repo, onnx_export, monkeypatch):
    out, _ = repo
    model, pb = _python_backend(out, "ldm", monkeypatch)
    params = _pbtxt_parameters((out / "ldm" / "config.pbtxt").read_text())
    a = np.stack([encode(["red sphere", "gray cube"])] * 2).astype(np.float32)
    b = encode(["cyan cylinder"])[None].astype(np.float32)

    def request(cond, seed, steps=None, apg_norm=None, class_scale=None, class_iters=None):
        inputs = [pb.Tensor("COND", cond), pb.Tensor("SEED", np.full((len(cond), 1), seed, np.int64))]
        if steps:
            inputs.append(pb.Tensor("STEPS", np.full((len(cond), 1), steps, np.int32)))
        if apg_norm is not None:
            inputs.append(pb.Tensor("APG_NORM", np.full((len(cond), 1), apg_norm, np.float32)))
        if class_scale is not None:
            inputs.append(pb.Tensor("CLASS_SCALE", np.full((len(cond), 1), class_scale, np.float32)))
        if class_iters is not None:
            inputs.append(pb.Tensor("CLASS_ITERS", np.full((len(cond), 1), class_iters, np.int32)))
        return pb.InferenceRequest("ldm", [], inputs)

    bad = request(b, 1)
    bad.inputs[1] = pb.Tensor("SEED", np.array([[1], [2]]))  # seeds differing within a request
    responses = model.execute([request(a, 3, 4), request(b, 8, 4), bad, request(b, 8, 4, apg_norm=0.0),
                               request(b, 8, 4, apg_norm=-1.0), request(b, 8, 4, class_scale=0.0),
                               request(b, 8, 4, class_scale=-2.0), request(b, 8, 4, class_iters=3),
                               request(b, 8, 4, class_iters=0)])
    assert responses[2].has_error() and "SEED" in responses[2].error().message()
    assert responses[4].has_error() and "APG_NORM must be 0" in responses[4].error().message()
    assert responses[6].has_error() and "CLASS_SCALE must be 0" in responses[6].error().message()
    assert responses[8].has_error() and "CLASS_ITERS must be a whole number" in responses[8].error().message()
    assert params["default_class_scale"]["string_value"] == "2.0"  # the export has class_grad: the runtime's default
    assert params["default_class_iters"]["string_value"] == str(DEFAULT_CLASS_ITERS)
    pipe = Pipeline(ExportFolder(onnx_export, threads=2))
    # the defaults (the runtime's guidance), and classifier-free and unguided-by-the-classifier requests beside them
    # in the same execute()
    for resp, cond, seed, kw in ((responses[0], a, 3, {}), (responses[1], b, 8, {}),
                                 (responses[3], b, 8, {"apg_norm": 0.0}), (responses[5], b, 8, {"class_scale": 0.0}),
                                 (responses[7], b, 8, {"class_iters": 3})):
        images = pb.get_output_tensor_by_name(resp, "IMAGES").as_numpy()
        np.testing.assert_allclose(images, pipe.generate(cond, steps=4, seed=seed, **kw), atol=1e-5)
    cfg, apg = (pb.get_output_tensor_by_name(responses[i], "IMAGES").as_numpy() for i in (3, 1))
    assert np.abs(cfg - apg).max() > 1e-4  # so the parity above tells the two guidances apart
    plain = pb.get_output_tensor_by_name(responses[5], "IMAGES").as_numpy()
    assert np.abs(plain - apg).max() > 1e-4  # and classifier guidance from none
    three_steps = pb.get_output_tensor_by_name(responses[7], "IMAGES").as_numpy()
    assert np.abs(three_steps - apg).max() > 1e-5  # and three descent steps from the default's one


def test_refuses_an_export_without_a_decoder(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"models": {}}))
    with pytest.raises(UserError, match="no decoder"):
        write_repository(tmp_path, tmp_path / "repo")


def test_a_layout_denoiser_s_places_come_with_the_repository(layout_export, tmp_path, monkeypatch):
    """A layout denoiser (python/core/layout.py): the placement prior is copied beside the Python backend, and each
    request draws its places from its SEED as the runtime does."""
    _, ex = layout_export
    out = tmp_path / "triton"
    write_repository(ex, out)
    assert (out / "ldm" / "1" / "layouts.npz").read_bytes() == (ex / "layouts.npz").read_bytes()
    model, pb = _python_backend(out, "ldm", monkeypatch)
    a = np.stack([encode(["red sphere", "gray cube"])] * 2).astype(np.float32)
    b = encode(["cyan cylinder"])[None].astype(np.float32)
    reqs = [pb.InferenceRequest("ldm", [], [pb.Tensor("COND", c), pb.Tensor("SEED", np.full((len(c), 1), s, np.int64)),
                                            pb.Tensor("STEPS", np.full((len(c), 1), 3, np.int32))])
            for c, s in ((a, 3), (b, 8))]
    responses = model.execute(reqs)
    pipe = Pipeline(ExportFolder(ex, threads=2))
    for resp, cond, seed in zip(responses, (a, b), (3, 8)):
        assert not resp.has_error(), resp.error().message()
        np.testing.assert_allclose(pb.get_output_tensor_by_name(resp, "IMAGES").as_numpy(),
                                   pipe.generate(cond, steps=3, seed=seed), atol=1e-5)
    (ex / "layouts.npz").write_bytes((ex / "layouts.npz").read_bytes() + b"x")
    try:
        with pytest.raises(UserError, match="checksum"):
            write_repository(ex, tmp_path / "triton2")
    finally:
        (ex / "layouts.npz").write_bytes((ex / "layouts.npz").read_bytes()[:-1])


def test_a_layout_generator_is_served_by_a_python_backend_that_draws_its_places(layout_export, tmp_path, monkeypatch):
    """A layout one-step generator (python/core/layout.py): the gan model is a Python backend in place of the ensemble,
    with the generator's own placement prior beside it, drawing noise and places from each request's SEED as the
    runtime does; a set larger than the prior places fails that request alone."""
    _, ex = layout_export
    out = tmp_path / "triton"
    write_repository(ex, out)
    assert (out / "gan" / "1" / GENERATOR_BANK_FILE).read_bytes() == (ex / GENERATOR_BANK_FILE).read_bytes()
    assert 'backend: "python"' in (out / "gan" / "config.pbtxt").read_text()
    model, pb = _python_backend(out, "gan", monkeypatch)
    a = np.stack([encode(["red sphere", "gray cube"])] * 2).astype(np.float32)
    b = encode(["cyan cylinder"])[None].astype(np.float32)
    four = encode(["red sphere", "gray cube", "blue cube", "cyan cylinder"])[None].astype(np.float32)
    reqs = [pb.InferenceRequest("gan", [], [pb.Tensor("COND", c), pb.Tensor("SEED", np.full((len(c), 1), s, np.int64))])
            for c, s in ((a, 3), (four, 1), (b, 8))]
    responses = model.execute(reqs)
    assert responses[1].has_error() and "holds scenes of [1, 2, 3]" in responses[1].error().message()
    pipe = Pipeline(ExportFolder(ex, threads=2))
    for resp, cond, seed in zip(responses[::2], (a, b), (3, 8)):
        assert not resp.has_error(), resp.error().message()
        np.testing.assert_allclose(pb.get_output_tensor_by_name(resp, "IMAGES").as_numpy(),
                                   pipe.generate(cond, "gan", seed=seed), atol=1e-5)
