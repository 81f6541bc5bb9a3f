"""The dataset manifest: the commit record of a sharded dataset.

`vfm shard` writes it **last**, after every shard is published and verified, so a reader that finds a
manifest finds a complete dataset. It holds the shard list (name, URL, sample count, bytes, sha256),
the class map (wnids; label = position; for the dense tasks also `categories`, the ids masks / annotations use),
the task its samples serve, per-group metadata (ImageNet-C corruption/severity) and the
report of every input sample that was skipped or repaired, with the reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from vfm import storage

MANIFEST_NAME = "manifest.json"
TIMM_INFO_NAME = "_info.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    name: str
    """File name relative to the manifest's folder; `url` is resolved from where the manifest lives."""
    num_samples: int
    bytes: int
    sha256: str
    url: str = ""
    group: str = ""
    index: str = ""
    """File name of the shard's sample index (a JSON list written by `vfm.data.shard`: the byte offset where each
    sample's members start, then where the last one ends), so a reader can fetch any run of samples by one ranged read.
    Empty in manifests written before it existed: readers then stream the shard from its start."""


@dataclass
class Manifest:
    dataset: str
    split: str
    classes: list[str]
    shards: list[ShardInfo]
    seed: int = 0
    shard_size: int = 0
    source: str = ""
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Group name -> metadata every sample of that group carries (e.g. {"corruption": .., "severity": ..})."""
    failures: list[dict[str, str]] = field(default_factory=list)
    """Input samples left out (`action: skipped`) or fixed (`action: repaired`): key, source, reason."""
    class_subset: dict[str, Any] = field(default_factory=dict)
    """The class / fraction subset this dataset was drawn as (`vfm shard --subset-classes`); {} when whole."""
    task: str = "classification"
    """What a sample holds (vfm.data.sources.SourceIndex.task): classification (`.cls`), semantic_segmentation
    (`.seg.png`), object_detection (annotations in `.json`), unlabelled (`vfm curate`: the image and its `.json`). Absent from manifests of classification datasets, old
    ones included, which therefore load as before."""
    categories: list[dict[str, Any]] = field(default_factory=list)
    """Dense tasks: [{"id", "name", ...}] with the dataset's own ids (ADE20K 1..150, mask value k; COCO's 80
    non-contiguous ids 1..90 with their supercategory); `classes` holds the same names in id order. [] otherwise."""
    format_version: int = FORMAT_VERSION
    location: str = ""
    """Where this manifest was loaded from (not serialised)."""

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def base_url(self) -> str:
        return storage.parent(self.location) if self.location else ""

    def shard_url(self, i: int) -> str:
        shard = self.shards[i]
        return storage.join(self.base_url, shard.name) if self.base_url else shard.url

    def failure_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for f in self.failures:
            k = f"{f['action']}:{f['reason']}"
            counts[k] = counts.get(k, 0) + 1
        return dict(sorted(counts.items()))

    def subset(self, group: str) -> Manifest:
        """The shards of one group (e.g. ImageNet-C `gaussian_noise/3`) as a manifest of their own."""
        if group not in self.groups:
            raise KeyError(f"{self.dataset}: no group {group!r}; groups are {sorted(self.groups)}")
        shards = [s for s in self.shards if s.group == group]
        sub = Manifest(**{**self._fields(), "shards": shards, "groups": {group: self.groups[group]}})
        sub.location = self.location
        return sub

    def _fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "location"}

    def to_json(self) -> str:
        d = self._fields()
        if d["task"] == "classification" and not d["categories"]:  # as manifests were before dense tasks
            del d["task"], d["categories"]
        d["shards"] = [asdict(s) for s in self.shards]
        d["num_samples"] = self.num_samples
        d["failure_counts"] = self.failure_counts()
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, location: str = "") -> Manifest:
        d = json.loads(text)
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{location or 'manifest'}: format_version {d.get('format_version')!r}, expected {FORMAT_VERSION}")
        d.pop("num_samples", None)
        d.pop("failure_counts", None)
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        m = cls(**d)
        m.location = location
        return m

    @classmethod
    def load(cls, url: str, endpoint_url: str | None = None) -> Manifest:
        """Load from a local path or `s3://` URL; a folder/prefix means its `manifest.json`."""
        url = str(url)
        if not url.endswith(".json"):
            url = storage.join(url, MANIFEST_NAME)
        if not storage.exists(url, endpoint_url):
            raise FileNotFoundError(
                f"no manifest at {url}: the dataset was never sharded there, or `vfm shard` has not finished "
                "(the manifest is written last); rerun `vfm shard` with the same arguments to complete it"
            )
        return cls.from_json(storage.read_bytes(url, endpoint_url).decode(), location=url)

    def timm_info(self) -> dict[str, Any]:
        """`_info.json` in the format timm's ReaderWds reads (`create_dataset('wds/..', root=dest)`)."""
        return {
            "name": self.dataset,
            "num_classes": self.num_classes,
            "splits": {
                self.split: {
                    "name": self.split,
                    "num_samples": self.num_samples,
                    "filenames": [s.name for s in self.shards],
                    "shard_lengths": [s.num_samples for s in self.shards],
                }
            },
        }
