"""The linear probe (vfm.evaluate.linear): on the local digits it learns far above chance and lands on
scikit-learn's logistic regression of the same features; 2 ranks holding disjoint shards equal 1."""

from __future__ import annotations

import os
import socket
from functools import partial

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from vfm.evaluate.linear import (
    HELDOUT_BUCKETS,
    ProbeConfig,
    _mix,
    grid,
    key_hashes,
    linear_probe,
    train_heads,
)


def _clustered(n: int, d: int, classes: int, seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.randint(0, classes, (n,), generator=g)
    feats = centres[labels] + noise * torch.randn(n, d, generator=g)
    return feats, labels, key_hashes(f"s{seed}-{i}" for i in range(n))


@pytest.fixture(scope="module")
def digits_features(tmp_path_factory):
    """CLS features of a random-init ViT on the local digits (the smoke data), train and val as the suite sees them."""
    import timm

    from vfm.data.digits import make_digits_archives
    from vfm.data.manifest import Manifest
    from vfm.data.shard import write_dataset
    from vfm.data.sources import index_source
    from vfm.evaluate.classify import align_classes
    from vfm.evaluate.linear import extract, probe_features
    from vfm.evaluate.suite import _loader, _normalize
    from vfm.export import ExportMeta

    root = tmp_path_factory.mktemp("linear")
    d = make_digits_archives(root / "digits")
    write_dataset(index_source("folder", str(d.train_folder)), str(root / "train"), split="val", max_samples_per_shard=500)
    write_dataset(index_source("in1k-val", str(d.val_tar), labels=str(d.val_labels)), str(root / "val"), split="val",
                  max_samples_per_shard=500)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                              depth=2).eval()
    meta = ExportMeta(timm_name="vit_tiny_patch16_224", kwargs={"img_size": 32, "patch_size": 8, "depth": 2},
                      num_classes=0, recipe_id="dinov2-giant", stage="pretrain", resolution=32, crop_pct=1.0, wnids=[],
                      seed=0)
    dev = torch.device("cpu")
    tm, vm = Manifest.load(str(root / "train/manifest.json")), Manifest.load(str(root / "val/manifest.json"))
    kw = dict(device=dev, autocast_dtype=None, normalize=_normalize(meta, dev))
    fn = partial(probe_features, n_last_blocks=1, avgpool=False)
    train = extract(model, _loader(tm, meta, batch_size=128, num_workers=0, with_meta=True), fn, description="train", **kw)
    val = extract(model, _loader(vm, meta, batch_size=128, num_workers=0, with_meta=True), fn, description="val", **kw)
    _, label_map = align_classes(tm.classes, vm.classes, where="val")
    val_labels = label_map[val[1]] if label_map is not None else val[1]
    return train, (val[0], val_labels), len(tm.classes)


def test_on_the_digits_the_probe_is_scikit_learns_logistic_regression(digits_features):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, val, classes = digits_features
    cfg = ProbeConfig(weight_decays=(1e-3, 1e-4))
    metrics, _ = linear_probe(train, val, classes, cfg, device=torch.device("cpu"))
    assert metrics["top1"] > 60.0, metrics  # chance is 10 %
    # scikit-learn on the same fit split, features and penalty: wd = 1 / (C · n)
    feats, labels, hashes = train
    fit = (_mix(hashes, 0x5EED) % np.uint64(HELDOUT_BUCKETS)) != 0
    x, y = feats[fit].double().numpy(), labels[fit].numpy()
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=1 / (metrics["weight_decay"] * len(y)), max_iter=5000, tol=1e-7).fit(scaler.transform(x), y)
    sk_top1 = 100 * clf.score(scaler.transform(val[0].double().numpy()), val[1].numpy())
    assert abs(metrics["top1"] - sk_top1) <= 1.0, (metrics, sk_top1)


def test_the_head_applies_to_raw_features_and_the_heldout_split_chooses():
    train = _clustered(400, 8, 4, seed=1, noise=2.0)
    val = _clustered(200, 8, 4, seed=2, noise=2.0)[:2]
    cfg = ProbeConfig(weight_decays=(10.0, 1e-3))  # a penalty so strong that it cannot win, and a sane one
    metrics, head = linear_probe(train, val, 4, cfg, device=torch.device("cpu"))
    assert metrics["weight_decay"] == 1e-3 and metrics["top1"] > 80.0, metrics
    with torch.no_grad():  # the standardisation is folded into W and b: the head takes raw features
        direct = 100.0 * (head(val[0]).argmax(1) == val[1]).float().mean().item()
    assert direct == pytest.approx(metrics["top1"])
    fit = torch.from_numpy((_mix(train[2], 0x5EED) % np.uint64(HELDOUT_BUCKETS)) != 0)  # the probe's fit split
    both = train_heads(train[0][fit], train[1][fit], 4, cfg, device=torch.device("cpu"))
    assert torch.allclose(both.weight[4:], head.weight) and torch.allclose(both.bias[4:], head.bias)


def test_bad_grids_are_refused():
    with pytest.raises(ValueError, match="positive"):
        grid([0.0])
    with pytest.raises(ValueError, match="one or more"):
        grid([])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, train, val, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # uneven, disjoint shards, as the ranks' loaders hand them out
        tr = slice(0, 230) if rank == 0 else slice(230, None)
        va = slice(0, 50) if rank == 0 else slice(50, None)
        metrics, _ = linear_probe((train[0][tr], train[1][tr], train[2][tr]), (val[0][va], val[1][va]), 5,
                                  ProbeConfig(weight_decays=(1e-2, 1e-3)), device=torch.device("cpu"))
        out[rank] = metrics
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process():
    train = _clustered(400, 12, 5, seed=3, noise=3.0)
    val = _clustered(120, 12, 5, seed=4, noise=3.0)[:2]
    single, _ = linear_probe(train, val, 5, ProbeConfig(weight_decays=(1e-2, 1e-3)), device=torch.device("cpu"))
    out = mp.get_context("spawn").Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), train, val, out), nprocs=2)
    assert out[0] == out[1]
    assert out[0].keys() == single.keys()
    for k, v in single.items():
        assert out[0][k] == pytest.approx(v, abs=1e-6), k
