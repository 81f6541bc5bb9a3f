"""k-NN against a brute-force reference (full similarity matrix, explicit per-class weighted votes),
hand-checkable cases, and the 2-rank gloo path giving the same answer as one process."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from vfm.evaluate.knn import extract_features, knn_classify, knn_predict, l2_normalise


def _clustered(n: int, d: int, classes: int, seed: int, noise: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(1234))
    labels = torch.randint(0, classes, (n,), generator=g)
    feats = centres[labels] + noise * torch.randn(n, d, generator=g)
    return l2_normalise(feats), labels


def _brute_force(train, train_labels, test, k, T, num_classes):
    """The protocol written out the slow way: all similarities, sort, exp-weighted class sums."""
    sims = test @ train.T  # the full matrix: fine at test size
    top_sims, idx = sims.sort(dim=1, descending=True)
    max_k = k
    weights = torch.softmax(top_sims[:, :max_k] / T, dim=1)
    scores = torch.zeros(test.shape[0], num_classes, dtype=torch.float64)
    for i in range(test.shape[0]):
        for j in range(k):
            scores[i, train_labels[idx[i, j]]] += weights[i, j].item()
    return scores


@pytest.mark.parametrize("block_size", [7, 64, 10_000])
def test_matches_brute_force(block_size):
    train, train_labels = _clustered(300, 16, 6, seed=0)
    test, test_labels = _clustered(50, 16, 6, seed=1)
    ks = (1, 5, 20)
    preds = knn_predict(train, train_labels, test, ks=ks, temperature=0.07, num_classes=6,
                        block_size=block_size, top=3)
    for k in ks:
        ref = _brute_force(train, train_labels, test, k, 0.07, 6)
        assert torch.equal(preds[k][:, 0], ref.argmax(dim=1)), k
        # top-3 as a set (ties among zero-score classes aside, the order is the score order)
        ref_top = ref.topk(3, dim=1)
        for i in range(test.shape[0]):
            nonzero = ref_top.values[i] > 0
            assert preds[k][i, : int(nonzero.sum())].tolist() == ref_top.indices[i][nonzero].tolist()


def test_max_k_softmax_does_not_change_small_k():
    """Weights are normalised over max(ks) neighbours; the k=5 answer must equal a k=5-only run."""
    train, train_labels = _clustered(200, 8, 4, seed=2)
    test, _ = _clustered(40, 8, 4, seed=3)
    both = knn_predict(train, train_labels, test, ks=(5, 50), num_classes=4, top=1)
    alone = knn_predict(train, train_labels, test, ks=(5,), num_classes=4, top=1)
    assert torch.equal(both[5], alone[5])


def test_hand_computed_vote():
    # one query on the x axis; neighbours at cos 1.0 (class 0), 0.8 (class 1), 0.6 (class 1)
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    q = torch.tensor([[1.0, 0.0]])
    # T = 1: exp(1) = 2.72 > exp(.8) + exp(.6) = 2.23 + 1.82 = 4.05 → class 1 wins with k = 3
    assert knn_predict(train, labels, q, ks=(1, 3), temperature=1.0, top=1) == {
        1: torch.tensor([[0]]), 3: torch.tensor([[1]])}
    # T = 0.07: exp(1/.07) dominates → class 0 wins even with k = 3
    assert knn_predict(train, labels, q, ks=(3,), temperature=0.07, top=1)[3].item() == 0


def test_accuracy_counts():
    train = torch.eye(3)
    labels = torch.tensor([0, 1, 2])
    test = torch.eye(3)
    metrics = knn_classify(train, labels, test, torch.tensor([0, 1, 0]), ks=(1,), topk=(1, 2))
    assert metrics["k1.top1"] == pytest.approx(200 / 3)
    assert set(metrics) == {"k1.top1", "k1.top2"}


def test_clear_errors():
    train, labels = _clustered(10, 4, 2, seed=0)
    with pytest.raises(ValueError, match="needs at least 20 train samples"):
        knn_predict(train, labels, train, ks=(20,))
    with pytest.raises(ValueError, match="out of range"):
        knn_predict(train, labels, train, ks=(1,), num_classes=1)
    with pytest.raises(ValueError, match="same D"):
        knn_predict(train, labels, torch.zeros(3, 5), ks=(1,))


def test_extract_features_cls_token_normalised():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32,
                              patch_size=8, depth=1)
    images = torch.randn(6, 3, 32, 32)
    batches = [(images[:4], torch.tensor([0, 1, 2, 3])), (images[4:], torch.tensor([4, 0]))]
    feats, labels = extract_features(model, batches)
    assert feats.shape == (6, model.embed_dim)  # the CLS embedding, not the 5 logits
    assert torch.allclose(feats.norm(dim=1), torch.ones(6))
    assert labels.tolist() == [0, 1, 2, 3, 4, 0]
    with torch.no_grad():
        cls = model.forward_features(images)[:, 0]  # timm ViT: final-norm tokens, CLS first
    assert torch.allclose(feats, l2_normalise(cls), atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, train, train_labels, test, test_labels, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # uneven, disjoint shards on purpose: rank 0 gets more train rows, rank 1 more test rows
        tr = slice(0, 170) if rank == 0 else slice(170, None)
        te = slice(0, 13) if rank == 0 else slice(13, None)
        metrics = knn_classify(train[tr], train_labels[tr], test[te], test_labels[te], ks=(1, 10, 20),
                               num_classes=5, block_size=16)
        out[rank] = metrics
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process():
    train, train_labels = _clustered(300, 12, 5, seed=4, noise=2.5)
    test, test_labels = _clustered(41, 12, 5, seed=5, noise=2.5)
    single = knn_classify(train, train_labels, test, test_labels, ks=(1, 10, 20), num_classes=5)
    out = mp.get_context("spawn").Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), train, train_labels, test, test_labels, out), nprocs=2)
    assert out[0] == out[1] == single
    # the exact count shows: 41 test samples, so every accuracy is a multiple of 100/41
    for v in single.values():
        assert round(v * 41 / 100, 6) == round(v * 41 / 100)
