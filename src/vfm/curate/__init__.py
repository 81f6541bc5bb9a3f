"""`vfm curate`: the pretraining data of the SSL recipes made from raw image pools on Ray Data (vfm.curate.run):
quality filter, decontamination against the evaluation sets, exact / perceptual-hash / embedding dedup, optional
retrieval around seed sets; WebDataset shards + manifest as `vfm shard` writes them, unlabelled; a report in MLflow.

Locally `ray_session()` starts Ray on this machine (`ray.init()`); in a KubeRay RayJob (vfm.launch.rayjob) the
driver joins the job's cluster (RAY_ADDRESS), and the same code runs on its workers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["ray_session"]


@contextlib.contextmanager
def ray_session(cpus: int | None = None, address: str | None = None) -> Iterator[None]:
    """Ray for the block: the cluster at `address` (or $RAY_ADDRESS, set inside a RayJob), else a local one with
    `cpus` CPUs; one that is already running (a test's, a notebook's) is used and left running."""
    import ray
    import ray.data

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # the workers inherit this environment (S3 endpoint, credentials); no dashboard: nothing serves it here
        ray.init(num_cpus=cpus, include_dashboard=False)
    ray.data.DataContext.get_current().enable_rich_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
