"""JPEG decode images/s on one core: PIL (training's decode) against TorchCodec (evaluation's decode, see
`vfm.data.loader.decode_sample`) and torchvision.io.decode_jpeg (deprecated by torchvision 0.29 for TorchCodec).

    python benchmarks/jpeg_decode.py [--images 200] [--sizes 256 500] [--repeats 5]

Same synthetic JPEG bytes for every decoder (`vfm.data.synthetic`, quality 90; 500 px averages ~95 KB, the
size of an ImageNet JPEG), best of `--repeats` passes, `torch.set_num_threads(1)`:
- PIL `Image.open(...).convert("RGB")`, a full decode, the loader's `decode_sample` for PIL transforms;
- `torchcodec.decoders.decode_image(bytes, mode="RGB")`, the loader's `decode_sample(as_tensor=True)`;
- PIL with `draft("RGB", (size/2, size/2))`, libjpeg's DCT-domain downscale (not used: it changes the pixels
  timm's transforms see);
- `torchvision.io.decode_jpeg`, one call per image and one call for the whole list (the batched API, which is
  what runs on nvjpeg with `device="cuda"`; `--cuda` adds that row when a GPU is present).
Prints images/s per decoder and each one's ratio to PIL. Never asserts timings.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image, features
from torchcodec.decoders import decode_image
from torchvision.io import decode_jpeg

from vfm.data.synthetic import jpeg_bytes, synthetic_image


def best_rate(fn, n: int, repeats: int) -> float:
    fn()  # warm
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 500])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cuda", action="store_true", help="also decode the list on the GPU (nvjpeg)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"Pillow {Image.__version__} (libjpeg-turbo: {features.check_feature('libjpeg_turbo')}), "
          f"torch {torch.__version__}, 1 thread")
    rng = np.random.default_rng(0)
    for size in args.sizes:
        blobs = [jpeg_bytes(synthetic_image(i % 20, 20, size, rng)) for i in range(args.images)]
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]

        def pil(blobs=blobs):
            for b in blobs:
                Image.open(io.BytesIO(b)).convert("RGB").load()

        def pil_draft(blobs=blobs, size=size):
            for b in blobs:
                im = Image.open(io.BytesIO(b))
                im.draft("RGB", (size // 2, size // 2))
                im.convert("RGB").load()

        def codec(blobs=blobs):
            for b in blobs:
                decode_image(b, mode="RGB")

        def tv_each(tensors=tensors):
            for t in tensors:
                decode_jpeg(t)

        def tv_list(tensors=tensors):
            decode_jpeg(tensors)

        rows = [("PIL open + convert (loader)", pil), ("PIL draft 1/2", pil_draft),
                ("TorchCodec decode_image (loader)", codec),
                ("decode_jpeg, one per image", tv_each), ("decode_jpeg, the list", tv_list)]
        if args.cuda and torch.cuda.is_available():
            def tv_cuda(tensors=tensors):
                decode_jpeg(tensors, device="cuda")
                torch.cuda.synchronize()
            rows.append(("decode_jpeg, the list, cuda", tv_cuda))
        kb = sum(map(len, blobs)) / len(blobs) / 1e3
        rates = {name: best_rate(fn, len(blobs), args.repeats) for name, fn in rows}
        base = rates["PIL open + convert (loader)"]
        for name, r in rates.items():
            print(f"{size}px ({kb:.0f} KB): {name:30s} {r:8.0f} images/s  {r / base:5.2f}x PIL")


if __name__ == "__main__":
    main()
