"""vfm's blockwise k-NN against scikit-learn's KNeighborsClassifier on the same features.

Random-but-clustered, L2-normalised features (default 20k train × 2k test × 384-d, 100 classes), k = 20,
cosine similarity, the DINOv2 weighting exp(sim / T) in both (sklearn through a `weights` callable), so
both do the same work and should agree on the predictions. Prints both wall times and the ratio; a
note, never a test (timings depend on the machine and its load).

    /work/venv/bin/python benchmarks/knn_vs_sklearn.py [--train 20000 --test 2000 --dim 384 --threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from vfm.evaluate.knn import knn_predict, l2_normalise


def clustered(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    return l2_normalise(centres[labels] + 3.0 * torch.randn(n, dim, generator=g)), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=20_000)
    ap.add_argument("--test", type=int, default=2_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=0.07)
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1, help="1 by default: both single-threaded (a shared machine oversubscribes threads)")
    args = ap.parse_args()

    train, train_labels = clustered(args.train, args.dim, args.classes, seed=1)
    test, test_labels = clustered(args.test, args.dim, args.classes, seed=2)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    ours = knn_predict(train, train_labels, test, ks=(args.k,), temperature=args.temperature,
                       num_classes=args.classes, block_size=args.block_size, top=1)[args.k][:, 0]
    t_vfm = time.perf_counter() - t0

    def weights(dist: np.ndarray) -> np.ndarray:  # cosine distance = 1 − similarity
        return np.exp(((1.0 - dist) - 1.0) / args.temperature)  # shifted by the max possible sim: no overflow

    clf = KNeighborsClassifier(n_neighbors=args.k, metric="cosine", algorithm="brute", weights=weights,
                               n_jobs=args.threads)
    with threadpool_limits(args.threads):
        t0 = time.perf_counter()
        clf.fit(train.numpy(), train_labels.numpy())
        theirs = torch.from_numpy(clf.predict(test.numpy()))
        t_sk = time.perf_counter() - t0

    agree = (ours == theirs).float().mean().item()
    acc = 100 * (ours == test_labels).float().mean().item()
    print(f"features: {args.train} train × {args.test} test × {args.dim}-d, {args.classes} classes, "
          f"k={args.k}, T={args.temperature}, threads={args.threads}")
    print(f"vfm knn_predict (block {args.block_size}): {t_vfm:.3f} s   top-1 {acc:.2f} %")
    print(f"sklearn KNeighborsClassifier (brute, cosine): {t_sk:.3f} s")
    print(f"ratio sklearn / vfm: {t_sk / t_vfm:.1f}×   prediction agreement: {100 * agree:.2f} %")


if __name__ == "__main__":
    main()
