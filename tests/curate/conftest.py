"""Fixtures of the curation tests."""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="session")
def copy_detector(tmp_path_factory):
    """(export URL, seconds to train) of the copy-detection model trained once per session
    (tests/helpers/copy_detector.py)."""
    from tests.helpers.copy_detector import train_copy_detector

    t0 = time.perf_counter()
    export = train_copy_detector(tmp_path_factory.mktemp("copy-detector"))
    return export, time.perf_counter() - t0


@pytest.fixture(scope="module")
def ray_two_cpus(services):
    """Ray on this machine with 2 CPUs for a test module. After `services`: its workers inherit this process's
    environment when Ray starts, S3 credentials included."""
    from vfm.curate import ray_session

    with ray_session(2):
        yield
