"""The GPUs a recipe's `hardware.gpu` may name, in one table per fact, keyed alike: dense bf16/fp16
tensor-core peak (FLOP/s) and memory (bytes) from NVIDIA's A100, H100 and H200 datasheets (`vfm plan`
prices runs with them, the training loop divides by the peak for MFU), and the `nvidia.com/gpu.product`
node label NVIDIA GPU feature discovery gives that GPU (the launcher's node selector)."""

GPU_SPECS: dict[str, tuple[float, float]] = {
    "H100-SXM-80GB": (989e12, 80e9),
    "H100-PCIe-80GB": (756e12, 80e9),
    "H200-141GB": (989e12, 141e9),
    "A100-SXM-80GB": (312e12, 80e9),
    "A100-40GB": (312e12, 40e9),
}

GPU_PRODUCTS: dict[str, str] = {
    "H100-SXM-80GB": "NVIDIA-H100-80GB-HBM3",
    "H100-PCIe-80GB": "NVIDIA-H100-PCIe",
    "H200-141GB": "NVIDIA-H200",
    "A100-SXM-80GB": "NVIDIA-A100-SXM4-80GB",
    "A100-40GB": "NVIDIA-A100-SXM4-40GB",
}
