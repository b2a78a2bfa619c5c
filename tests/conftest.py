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
