from __future__ import annotations

import pytest

from tests.helpers.shards import make_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    """64 learnable 32 px images in 4 classes (n00000000..n00000003), 4 shards; the manifest path."""
    return make_shards(tmp_path_factory.mktemp("shards4"), num_classes=4, per_class=16)


@pytest.fixture(scope="session")
def shards5(tmp_path_factory) -> str:
    """The same 4 classes plus a fifth the pretraining set lacks (like teddy bear in fall11)."""
    return make_shards(tmp_path_factory.mktemp("shards5"), num_classes=5, per_class=8, seed=1)
