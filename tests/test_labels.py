import json

import numpy as np
import pytest

from python.core.errors import UserError
from python.core.labels import (
    CLASS_NAMES,
    OBJECTS,
    decode,
    encode,
    encode_many,
    load_conditions,
    load_objects,
    parse_label_arg,
)


def test_official_mapping():
    # SPEC.md: colours gray..yellow, shapes cube, sphere, cylinder, shape-major.
    assert OBJECTS["gray cube"] == 0 and OBJECTS["red cube"] == 1 and OBJECTS["yellow cube"] == 7
    assert OBJECTS["gray sphere"] == 8 and OBJECTS["yellow sphere"] == 15
    assert OBJECTS["gray cylinder"] == 16 and OBJECTS["yellow cylinder"] == 23
    assert sorted(OBJECTS.values()) == list(range(24)) and CLASS_NAMES[9] == "red sphere"


def test_encode_decode_round_trip():
    v = encode(["cyan cylinder", "red cube"])
    assert v.dtype == np.float32 and v.sum() == 2 and v[OBJECTS["cyan cylinder"]] == 1 and v[1] == 1
    assert decode(v) == ["red cube", "cyan cylinder"]
    assert parse_label_arg(" red sphere , yellow cube").nonzero()[0].tolist() == [7, 9]


@pytest.mark.parametrize("bad, msg", [
    (["grey cube"], "unknown label 'grey cube'; valid names are: gray cube, red cube"),
    (["red cube", "red cube"], "repeated"),
    ([], "empty label list"),
    ("red cube", "expected a list"),
    ([3], "expected a list"),
])
def test_bad_label_sets(bad, msg):
    with pytest.raises(UserError, match=msg.replace("(", r"\(")):
        encode(bad)


def test_condition_file(tmp_path):
    f = tmp_path / "test.json"
    f.write_text(json.dumps([["gray cube"], ["red cube"], ["blue cube", "green cube"]]))
    c = load_conditions(f)
    assert c.shape == (3, 24) and c[2, 2] == c[2, 3] == 1 and c.sum() == 4
    f.write_text("[[\"gray cube\"], ")
    with pytest.raises(UserError, match=r"test.json: malformed JSON"):
        load_conditions(f)
    f.write_text(json.dumps([["gray cube"], ["grey cube"]]))
    with pytest.raises(UserError, match=r"test.json\[1\]: unknown label 'grey cube'"):
        load_conditions(f)
    with pytest.raises(UserError, match="file not found"):
        load_conditions(tmp_path / "missing.json")


@pytest.mark.parametrize("mapping", [{"a": 0, "b": 2}, {"a": 0, "b": 0}, {"a": "0"}, [], {}])
def test_objects_json_must_be_0_to_n(tmp_path, mapping):
    f = tmp_path / "objects.json"
    f.write_text(json.dumps(mapping))
    with pytest.raises(UserError, match="objects.json"):
        load_objects(f)


def test_encode_many_reports_index():
    with pytest.raises(UserError, match=r"labels\[1\]: empty"):
        encode_many([["red cube"], []])
