"""Datasheet figures of the GPUs a recipe's `hardware.gpu` may name: dense bf16/fp16 tensor-core peak
(FLOP/s) and memory (bytes), from NVIDIA's A100, H100 and H200 datasheets. `vfm plan` prices runs with
them and the training loop divides by the peak for MFU."""

GPU_SPECS: dict[str, tuple[float, float]] = {
    "H100-SXM-80GB": (989e12, 80e9),
    "H100-PCIe-80GB": (756e12, 80e9),
    "H200-141GB": (989e12, 141e9),
    "A100-SXM-80GB": (312e12, 80e9),
    "A100-40GB": (312e12, 40e9),
}
