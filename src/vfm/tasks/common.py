"""What every task shares: its training data is a `vfm shard` manifest, loaded on first use."""

from __future__ import annotations

from vfm.errors import UserError


def load_manifest(url: str):
    """The manifest at `url` (path or s3://); a missing one is a user error that says how to make it."""
    from vfm.data.manifest import Manifest

    try:
        return Manifest.load(url)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None


class ManifestData:
    """The `data_url` manifest of a task, loaded once (tests and the throughput harness may set
    `_manifest` to a stand-in)."""

    data_url: str
    _manifest = None

    @property
    def manifest(self):
        if self._manifest is None:
            self._manifest = load_manifest(self.data_url)
        return self._manifest

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples
