"""The shard reader: exact resume, disjoint evaluation split, S3 streaming, metadata, transforms."""

from __future__ import annotations

import collections
import json
import multiprocessing

import pytest
import torch

from vfm import storage
from vfm.data import loader as loader_module
from vfm.data.loader import build_loader, slot_stream
from vfm.data.manifest import Manifest
from vfm.data.shard import write_dataset
from vfm.data.sources import index_source
from vfm.data.synthetic import make_synthetic_folder
from vfm.data.transforms import build_transform
from vfm.recipes.schema import AugmentConfig, DataConfig

TRAIN_TF = build_transform(DataConfig(dataset="folder", resolution=16, augment=AugmentConfig(
    rand_augment="rand-m9-mstd0.5", force_color_jitter=True, random_erase=0.25)), is_training=True)
EVAL_TF = build_transform(DataConfig(dataset="folder", resolution=16), is_training=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Manifest:
    root = tmp_path_factory.mktemp("loader")
    make_synthetic_folder(root / "src", num_classes=5, per_class=9, size=20, seed=0)  # 45 samples
    report = write_dataset(index_source("folder", str(root / "src")), str(root / "shards"), seed=2,
                           shard_size=4000)
    assert len(report.manifest.shards) >= 5
    return Manifest.load(str(root / "shards"))


def drain(loader, n=None):
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly(dataset, num_workers):
    kw = dict(transform=TRAIN_TF, batch_size=4, world_size=2, seed=5, shuffle=True, num_workers=num_workers,
              shuffle_buffer=8)
    for rank in range(2):
        ref = build_loader(dataset, rank=rank, **kw)
        epochs = [drain(ref) for _ in range(3)]  # 5 batches per epoch; the streams wrap data epochs
        flat = [b for e in epochs for b in e]
        assert len(ref) == 5 and len(flat) == 15
        for stop in (3, 7):  # mid-epoch, in the second epoch
            first = build_loader(dataset, rank=rank, **kw)
            got = []
            while len(got) < stop:
                got += drain(first, stop - len(got))
            state = first.state_dict()
            resumed = build_loader(dataset, rank=rank, **kw)
            resumed.load_state_dict(state)
            while len(got) < 15:
                got += drain(resumed)
            assert same(got, flat), (rank, stop)


def test_one_worker_pipeline_serves_every_training_epoch(dataset, monkeypatch):
    """Training's DataLoader (its workers and their prefetched batches) lives across loader epochs; a moved
    position starts a new one at the right batch; evaluation starts over each pass."""
    made = []

    def counting(*args, **kwargs):
        made.append(args[0].start_batch)
        return torch.utils.data.DataLoader(*args, **kwargs)

    monkeypatch.setattr(loader_module, "DataLoader", counting)
    before = set(multiprocessing.active_children())
    kw = dict(transform=TRAIN_TF, batch_size=4, rank=1, world_size=2, seed=5, shuffle=True, num_workers=2)
    train = build_loader(dataset, **kw)
    epochs = [drain(train) for _ in range(3)]
    assert made == [0] and [len(e) for e in epochs] == [5, 5, 5]
    train.load_state_dict({**train.state_dict(), "batches_yielded": 7})
    again = drain(train)
    assert made == [0, 7] and same(again, epochs[1][2:])
    made.clear()
    evaluation = build_loader(dataset, **{**kw, "transform": EVAL_TF, "shuffle": False}, drop_last=False)
    assert same(drain(evaluation), drain(evaluation)) and made == [0, 0]
    assert set(multiprocessing.active_children()) > before
    del train
    assert set(multiprocessing.active_children()) <= before  # no reference cycle keeps the workers up


def test_slot_streams_cover_each_data_epoch_exactly_once_in_equal_shares(dataset):
    for num_slots in (1, 3, 4, 8, 16):  # 16 slots > shards: shards are split between slots
        for epoch_seed in (1, 2):
            shares = [[s["__key__"] for s in slot_stream(dataset, slot=slot, num_slots=num_slots, seed=epoch_seed,
                                                        shuffle=True, shuffle_buffer=4, start=0, repeat=False)]
                      for slot in range(num_slots)]
            keys = [k for share in shares for k in share]
            assert len(keys) == len(set(keys)) == dataset.num_samples, num_slots
            # uniform: every slot reads the same number of samples (±1), so none is seen more often than another
            assert max(map(len, shares)) - min(map(len, shares)) <= 1, (num_slots, list(map(len, shares)))


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Manifest:
    """14 shards of about 10 samples: the ratio of the issue's 140 shards over 64 ranks, scaled down."""
    root = tmp_path_factory.mktemp("loader14")
    make_synthetic_folder(root / "src", num_classes=7, per_class=20, size=12, seed=4)
    write_dataset(index_source("folder", str(root / "src")), str(root / "shards"), seed=3,
                  max_samples_per_shard=10)
    m = Manifest.load(str(root / "shards"))
    assert len(m.shards) == 14 and all(s.index for s in m.shards)
    return m


@pytest.mark.parametrize(("world_size", "num_workers"), [(4, 2), (3, 0), (2, 3), (8, 1)])
def test_a_training_epoch_sees_every_sample_once(many_shards, world_size, num_workers):
    """One loader epoch over every rank and worker: each sample once, up to one batch per rank either way
    (the epoch is whole global batches, and a slot's share is not a whole number of batches)."""
    batch = 2
    seen: collections.Counter = collections.Counter()
    for rank in range(world_size):
        loader = build_loader(many_shards, transform=EVAL_TF, batch_size=batch, rank=rank, world_size=world_size,
                              seed=0, shuffle=True, num_workers=num_workers, with_meta=True, shuffle_buffer=4)
        for b in drain(loader):
            seen.update(m["key"] for m in b["meta"])
    n = many_shards.num_samples
    assert max(seen.values()) <= 2
    slack = world_size * batch
    assert sum(1 for c in seen.values() if c == 2) <= slack, sorted(seen.values())
    assert n - len(seen) <= slack + n % (world_size * batch), (n, len(seen))


@pytest.mark.parametrize("num_slots", [4, 28])  # fewer slots than shards, and two slots per shard
def test_an_epoch_reads_the_dataset_bytes_once(many_shards, monkeypatch, num_slots):
    read = collections.Counter()
    opened = storage.open_read

    def counting(url, endpoint_url=None, **kw):
        f = opened(url, endpoint_url, **kw)
        real = f.read

        def read_(n=-1):
            data = real(n)
            read[url] += len(data)
            return data
        f.read = read_
        return f
    monkeypatch.setattr(loader_module.storage, "open_read", counting)
    keys = [s["__key__"] for slot in range(num_slots)
            for s in slot_stream(many_shards, slot=slot, num_slots=num_slots, seed=0, shuffle=True, shuffle_buffer=4,
                                 start=0, repeat=False)]
    assert len(keys) == many_shards.num_samples
    sample_bytes = sum(int(loader_module._sample_offsets(storage.join(many_shards.base_url, s.index))[-1])
                       for s in many_shards.shards)
    total = sum(v for k, v in read.items() if k.endswith(".tar"))
    assert abs(total - sample_bytes) <= 0.05 * sample_bytes, (total, sample_bytes)


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (3, 2), (4, 0)])
def test_eval_mode_sees_every_sample_once_without_padding(dataset, world_size, num_workers):
    seen = collections.Counter()
    for rank in range(world_size):
        loader = build_loader(dataset, transform=EVAL_TF, batch_size=4, rank=rank, world_size=world_size, seed=0,
                              shuffle=False, drop_last=False, num_workers=num_workers, with_meta=True)
        batches = drain(loader)
        assert len(batches) == len(loader)
        for b in batches:
            assert b["image"].shape[1:] == (3, 16, 16)
            for label, meta in zip(b["label"].tolist(), b["meta"], strict=True):
                assert dataset.classes[label] == meta["wnid"]
                seen[meta["key"]] += 1
        assert sum(len(b["label"]) for b in drain(loader)) == sum(len(b["label"]) for b in batches)  # re-iterable
    assert len(seen) == dataset.num_samples and set(seen.values()) == {1}


def test_training_epochs_have_equal_length_on_every_rank(dataset):
    lens = [len(build_loader(dataset, transform=EVAL_TF, batch_size=3, rank=r, world_size=3, seed=0, shuffle=True,
                             epoch_length=40)) for r in range(3)]
    assert lens == [4, 4, 4]
    with pytest.raises(ValueError, match="smaller than one global batch"):
        build_loader(dataset, transform=EVAL_TF, batch_size=64, rank=0, world_size=1, seed=0, shuffle=True)


def test_state_from_another_topology_is_refused(dataset):
    a = build_loader(dataset, transform=EVAL_TF, batch_size=4, rank=0, world_size=2, seed=0, shuffle=True)
    b = build_loader(dataset, transform=EVAL_TF, batch_size=4, rank=0, world_size=4, seed=0, shuffle=True)
    with pytest.raises(ValueError, match="world_size"):
        b.load_state_dict(a.state_dict())


def test_streams_s3_shards_by_ranged_reads(tmp_path, s3_endpoint, bucket):
    make_synthetic_folder(tmp_path / "src", num_classes=3, per_class=4, size=16, seed=3)
    write_dataset(index_source("folder", str(tmp_path / "src")), f"s3://{bucket}/ds", shard_size=2000,
                  endpoint_url=s3_endpoint)
    loader = build_loader(f"s3://{bucket}/ds/manifest.json", transform=EVAL_TF, batch_size=5, rank=0, world_size=1,
                          seed=0, shuffle=False, drop_last=False)
    labels = torch.cat([y for _, y in drain(loader)])
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_timm_reader_reads_the_shards(dataset):
    from timm.data import create_dataset

    ds = create_dataset("wds/folder", root=dataset.base_url, split="train", is_training=False, batch_size=1)
    labels = sorted(int(t) for _, t in ds)
    want = sorted(json.loads(json.dumps(i)) for i in range(dataset.num_classes) for _ in range(9))
    assert labels == want


def test_manifests_without_sample_indexes_still_read_exact_shares(many_shards, monkeypatch):
    """A manifest from before sample indexes: each share is streamed from its shard's start, with a warning."""
    import dataclasses

    old = dataclasses.replace(many_shards, shards=[dataclasses.replace(s, index="") for s in many_shards.shards])
    old.location = many_shards.location + "#old"
    warned: list[str] = []
    monkeypatch.setattr(loader_module.log, "warning", lambda msg, *args: warned.append(msg % args))
    keys = [s["__key__"] for slot in range(28)
            for s in slot_stream(old, slot=slot, num_slots=28, seed=0, shuffle=True, shuffle_buffer=4, start=0,
                                 repeat=False)]
    assert len(keys) == len(set(keys)) == many_shards.num_samples
    assert len(warned) == 1 and "has no sample indexes" in warned[0]
