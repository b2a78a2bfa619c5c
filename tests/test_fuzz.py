"""Fuzzing the parsers that take what users type or send: the condition files and the server's request bodies.
Whatever the input, the answer is a parsed value or the parser's one-line error (UserError / BadRequest): never a
traceback, never a 500. Bounded examples, so the suite stays fast."""
import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from python.core.errors import UserError
from python.core.labels import CLASS_NAMES, load_conditions
from runtime.serve import BadRequest, Limits, parse_body

names = st.sampled_from(CLASS_NAMES) | st.text(max_size=30)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | names,
                           lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner,
                                                                                        max_size=6), max_leaves=30)
label_lists = st.lists(st.lists(names, max_size=5) | json_values, max_size=8)
request_fields = st.fixed_dictionaries({}, optional={
    "labels": st.lists(names, max_size=6) | json_values, "n": st.integers(-5, 100) | json_values,
    "model": st.sampled_from(["ldm", "gan", "vae"]) | json_values, "steps": st.integers(-5, 2000) | json_values,
    "guidance": st.floats(allow_nan=True) | json_values, "eta": st.floats() | json_values,
    "seed": st.integers() | json_values, "best_of": st.integers(-2, 40) | json_values,
    "sampler": st.sampled_from(["ddim", "dpmpp", "x"]) | json_values, "format": json_values, "scores": json_values})
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(content=label_lists | json_values)
def test_condition_files_parse_or_say_what_is_wrong(tmp_path, content):
    path = tmp_path / "conditions.json"
    path.write_text(json.dumps(content))
    try:
        cond = load_conditions(path)
    except UserError as e:
        assert "\n" not in str(e) and len(str(e)) < 2000
        return
    assert cond.dtype == np.float32 and cond.shape == (len(content), 24) and set(np.unique(cond)) <= {0.0, 1.0}


@FAST
@given(raw=st.binary(max_size=200))
def test_condition_files_of_any_bytes(tmp_path, raw):
    path = tmp_path / "conditions.json"
    path.write_bytes(raw)
    try:
        load_conditions(path)
    except UserError as e:
        assert "\n" not in str(e)


@FAST
@given(body=request_fields | json_values)
def test_request_bodies_parse_or_are_a_400(body):
    try:
        req = parse_body(json.dumps(body).encode(), Limits())
    except BadRequest as e:
        assert "\n" not in str(e)
        return
    assert 1 <= req["n"] <= 64 and 1 <= req["steps"] <= 1000 and 0 <= req["guidance"] <= 20
    assert req["n"] * req["best_of"] * (req["steps"] if req["model"] == "ldm" else 1) <= Limits().max_work


@FAST
@given(raw=st.binary(max_size=300))
def test_request_bodies_of_any_bytes(raw):
    try:
        parse_body(raw, Limits())
    except BadRequest as e:
        assert "\n" not in str(e)
