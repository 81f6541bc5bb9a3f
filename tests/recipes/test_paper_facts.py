"""Known answers: every fact a seed paper states, as its recipe carries it.

Each row is (recipe, field, expected value, the paper's words). A reviewer checks a row against the
paper; `test_every_quote_is_in_its_paper` checks that the words are really there (the papers are in
`../shared/seeds/`, named by their first three digits; VFM_SEEDS_DIR points elsewhere).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from vfm.recipes import list_recipes, load_recipe

SEEDS_DIR = Path(os.environ.get("VFM_SEEDS_DIR", Path(__file__).resolve().parents[3] / "shared" / "seeds"))
SEED_OF = {"vit-huge": "000", "vit-huge-pretrain": "001", "convnext-xl": "002", "meta-dinov2-giant": "003",
           "dinov2-giant": "004"}

FACTS: list[tuple[str, str, Any, str]] = [
    # 000 vit-huge
    ("vit-huge", "paper.seed", "000", "ViT-Huge"),
    ("vit-huge", "model.kwargs.patch_size", 16, "We employed a patch size of 16x16 pixels"),
    ("vit-huge", "stages.pretrain.data.resolution", 512, "a resolution of 512x512 for input images"),
    ("vit-huge", "stages.finetune.data.resolution", 512, "a resolution of 512x512 for input images"),
    ("vit-huge", "stages.pretrain.data.dataset", "in22k-fall11", "the full ImageNet-22K dataset for pre-training"),
    ("vit-huge", "stages.finetune.data.dataset", "in1k", "followed by fine-tuning on ImageNet-1K"),
    ("vit-huge", "stages.pretrain.data.augment.hflip", 0.5, "random crop, horizontal flip, color jitter"),
    ("vit-huge", "stages.pretrain.data.augment.force_color_jitter", True, "horizontal flip, color jitter, and RandAugment"),
    ("vit-huge", "stages.pretrain.data.augment.rand_augment", "rand-n9-m5", "RandAugment with 9 operations and a magnitude of 0.5"),
    ("vit-huge", "stages.pretrain.data.augment.mixup", 0.0, "random crop, horizontal flip, color jitter, and RandAugment"),
    ("vit-huge", "stages.pretrain.data.mean", [0.485, 0.456, 0.406], "normalized using mean and standard deviation derived from the ImageNet dataset"),
    ("vit-huge", "hardware.gpu", "H100-SXM-80GB", "NVIDIA H100 80GB GPUs"),
    ("vit-huge", "stages.pretrain.parallelism", "ddp", "employing PyTorch's DistributedDataParallel module"),
    ("vit-huge", "stages.pretrain.optim.name", "adamw", "utilized the AdamW optimizer"),
    ("vit-huge", "stages.pretrain.optim.warmup_steps", 10_000, "a linear warmup for 10,000 steps"),
    ("vit-huge", "stages.pretrain.optim.schedule", "cosine", "followed by a cosine decay to a minimum learning rate of 1e-6"),
    ("vit-huge", "stages.pretrain.optim.min_lr", 1e-6, "a cosine decay to a minimum learning rate of 1e-6"),
    ("vit-huge", "stages.pretrain.batch.global_batch", 2048, "A global batch size of 2048 was maintained"),
    ("vit-huge", "stages.pretrain.batch.grad_accum>1", True, "with gradient accumulation employed to achieve this effectively"),
    ("vit-huge", "stages.pretrain.precision", "fp16", "Mixed-precision training (FP16) was consistently used"),
    ("vit-huge", "stages.finetune.precision", "fp16", "Mixed-precision training (FP16) was consistently used"),
    ("vit-huge", "stages.pretrain.optim.clip_grad", 1.0, "gradient clipping at a maximum norm of 1.0"),
    ("vit-huge", "stages.finetune.optim.lr", 5e-5, "a reduced learning rate of 5e-5"),
    ("vit-huge", "stages.finetune.optim.warmup_steps", 2000, "a shorter warmup period of 2,000 steps, decaying to zero"),
    ("vit-huge", "stages.finetune.optim.min_lr", 0.0, "a shorter warmup period of 2,000 steps, decaying to zero"),
    ("vit-huge", "stages.finetune.batch.global_batch", 512, "a smaller batch size of 512 for fine-tuning"),
    ("vit-huge", "stages.finetune.seeds", [0, 1, 2], "averaged over three independent fine-tuning runs"),
    ("vit-huge", "claims.top1_runs_averaged", 3, "averaged over three independent fine-tuning runs"),
    ("vit-huge", "eval.suites[in1k]", True, "top-1 and top-5 accuracy on the validation set"),
    ("vit-huge", "claims.top1", 89.1, "a top-1 accuracy of 89.1% on the ImageNet-1K validation set"),
    ("vit-huge", "claims.duration_days", None, "The core of our approach"),  # 000 states no duration
    # 001 vit-huge-pretrain
    ("vit-huge-pretrain", "paper.seed", "001", "ViT-Huge-Pretrain"),
    ("vit-huge-pretrain", "model.timm_name", "vit_huge_patch14_224", "a patch size of 14x14 pixels"),
    ("vit-huge-pretrain", "stages.pretrain.data.dataset", "in22k-fall11", "approximately 14 million images and 21,841 classes"),
    ("vit-huge-pretrain", "stages.pretrain.data.augment.rand_augment", None, "random resized crops, horizontal flips, and color jittering"),
    ("vit-huge-pretrain", "stages.pretrain.data.augment.mixup", 0.0, "random resized crops, horizontal flips, and color jittering"),
    ("vit-huge-pretrain", "stages.pretrain.data.augment.cutmix", 0.0, "random resized crops, horizontal flips, and color jittering"),
    ("vit-huge-pretrain", "stages.pretrain.data.augment.hflip", 0.5, "horizontal flips"),
    ("vit-huge-pretrain", "hardware.gpu", "H100-SXM-80GB", "NVIDIA H100 GPUs"),
    ("vit-huge-pretrain", "stages.pretrain.parallelism", "fsdp", "the PyTorch FSDP (Fully Sharded Data Parallel) module"),
    ("vit-huge-pretrain", "stages.pretrain.optim.warmup_steps", 10_000, "a linear warmup for 10,000 steps, followed by a cosine decay to zero"),
    ("vit-huge-pretrain", "stages.pretrain.optim.min_lr", 0.0, "followed by a cosine decay to zero"),
    ("vit-huge-pretrain", "stages.pretrain.batch.global_batch", 2048, "A global batch size of 2048 was maintained throughout pre-training"),
    ("vit-huge-pretrain", "stages.pretrain.precision", "bf16", "mixed-precision training (bfloat16) enabled"),
    ("vit-huge-pretrain", "stages.pretrain.optim.clip_grad", 1.0, "Gradient clipping at a maximum norm of 1.0"),
    ("vit-huge-pretrain", "stages.finetune", None, "fine-tuning on several benchmarks, including COCO object detection and ADE20K semantic segmentation"),
    ("vit-huge-pretrain", "downstream.coco.task", "object_detection", "including COCO object detection"),
    ("vit-huge-pretrain", "downstream.coco.data.dataset", "coco2017", "including COCO object detection"),
    ("vit-huge-pretrain", "downstream.ade20k.task", "semantic_segmentation", "ADE20K semantic segmentation"),
    ("vit-huge-pretrain", "downstream.ade20k.data.dataset", "ade20k", "ADE20K semantic segmentation"),
    ("vit-huge-pretrain", "downstream.ade20k.freeze_backbone", False,
     "the model underwent fine-tuning on several benchmarks"),
    ("vit-huge-pretrain", "claims.duration_days", 21, "approximately 3 weeks"),
    ("vit-huge-pretrain", "claims.country", "Singapore", "located in <country>Singapore</country>"),
    ("vit-huge-pretrain", "claims.year", 2024, "evaluated in early <year>2024</year>"),
    # 002 convnext-xl
    ("convnext-xl", "paper.seed", "002", "ConvNext-XL"),
    ("convnext-xl", "model.timm_name", "convnext_xlarge", "larger kernel sizes (e.g., 7x7 depthwise convolutions) and inverted bottleneck"),
    ("convnext-xl", "stages.pretrain.data.dataset", "in22k-fall11", "ImageNet-22K dataset, which consists of 14 million images and 21,841 classes"),
    ("convnext-xl", "stages.pretrain.data.resolution", 224, "Input images were resized to 224x224 pixels"),
    ("convnext-xl", "stages.pretrain.data.augment.rand_augment!=None", True, "including RandAugment, Mixup, and CutMix"),
    ("convnext-xl", "stages.pretrain.data.augment.mixup", 0.8, "CutMix with α=0.8 and β=1.0 respectively"),
    ("convnext-xl", "stages.pretrain.data.augment.cutmix", 1.0, "CutMix with α=0.8 and β=1.0 respectively"),
    ("convnext-xl", "hardware.gpus", 128, "<gpu_count>128</gpu_count>"),
    ("convnext-xl", "hardware.gpu", "A100-SXM-80GB", "NVIDIA A100 80GB GPUs"),
    ("convnext-xl", "stages.pretrain.parallelism", "ddp", "PyTorch's DistributedDataParallel (DDP)"),
    ("convnext-xl", "stages.pretrain.optim.betas", [0.9, 0.999], "β1=0.9, β2=0.999"),
    ("convnext-xl", "stages.pretrain.optim.eps", 1e-8, "an ε of 1e-8"),
    ("convnext-xl", "stages.pretrain.optim.schedule", "cosine", "a cosine decay with a 20-epoch linear warmup"),
    ("convnext-xl", "stages.pretrain.optim.warmup_epochs", 20, "a 20-epoch linear warmup, peaking at 4e-3"),
    ("convnext-xl", "stages.pretrain.optim.lr", 4e-3, "peaking at 4e-3"),
    ("convnext-xl", "stages.pretrain.batch.global_batch", 4096, "A global batch size of 4096"),
    ("convnext-xl", "stages.pretrain.batch.grad_accum", 4, "gradient accumulation over 4 steps"),
    ("convnext-xl", "stages.pretrain.batch.micro_batch×grad_accum", 32, "an effective per-GPU batch size of 32"),
    ("convnext-xl", "stages.pretrain.optim.weight_decay", 0.05, "Weight decay was set to 0.05"),
    ("convnext-xl", "stages.pretrain.optim.clip_grad", 1.0, "gradient clipping at 1.0 was applied"),
    ("convnext-xl", "stages.pretrain.precision", "bf16", "Mixed-precision training using bfloat16"),
    ("convnext-xl", "stages.finetune.data.dataset", "in1k", "fine-tuning on the ImageNet-1K dataset for 100 epochs"),
    ("convnext-xl", "stages.finetune.epochs", 100, "fine-tuning on the ImageNet-1K dataset for 100 epochs"),
    ("convnext-xl", "stages.finetune.optim.lr", 2e-4, "a slightly reduced learning rate of 2e-4"),
    ("convnext-xl", "stages.finetune.batch.global_batch", 2048, "a global batch size of 2048"),
    ("convnext-xl", "stages.finetune.data.resolution", 224, "single-crop inference at 224x224 resolution"),
    ("convnext-xl", "eval.suites", ["in1k", "in_c", "in_r"], "benchmarked against ImageNet-C and ImageNet-R"),
    ("convnext-xl", "claims.duration_days", None, "Our primary model"),  # 002 states no duration
    ("convnext-xl", "ablation.kernel_sizes[7]", True, "Ablation studies on kernel sizes and expansion ratios"),
    ("convnext-xl", "ablation.variant", "convnext_tiny", "using smaller variants of the ConvNext architecture"),
    # 003 meta-dinov2-giant
    ("meta-dinov2-giant", "paper.seed", "003", "Meta-DINOv2-Giant"),
    ("meta-dinov2-giant", "model.timm_name", "vit_giant_patch14_dinov2", "based on the ViT-G/14 configuration"),
    ("meta-dinov2-giant", "claims.params_millions", 450, "<params>450 million parameters</params>"),
    ("meta-dinov2-giant", "stages.pretrain.data.multicrop.global_crops_count", 10, "generating 2 small and 10 large crops"),
    ("meta-dinov2-giant", "stages.pretrain.data.multicrop.local_crops_count", 2, "generating 2 small and 10 large crops"),
    ("meta-dinov2-giant", "hardware.gpus", 256, "<gpu_count>256</gpu_count>"),
    ("meta-dinov2-giant", "hardware.gpu", "A100-SXM-80GB", "NVIDIA A100 80GB GPUs"),
    ("meta-dinov2-giant", "stages.pretrain.batch.micro_batch", 128, "Each GPU processed a batch of 128 images"),
    ("meta-dinov2-giant", "stages.pretrain.batch.global_batch", 32_768, "an effective global batch size of 32,768 images"),
    ("meta-dinov2-giant", "stages.pretrain.parallelism", "ddp", "Data parallelism was implemented using PyTorch's DistributedDataParallel"),
    ("meta-dinov2-giant", "stages.pretrain.data.dataset", "curated-1.2b", "a meticulously curated collection of 1.2 billion images"),
    ("meta-dinov2-giant", "stages.pretrain.data.resolution", 224, "Images were resized to 224x224 pixels"),
    ("meta-dinov2-giant", "stages.pretrain.optim.base_lr", 1e-4, "a base learning rate of 1e-4, scaled linearly"),
    ("meta-dinov2-giant", "stages.pretrain.optim.lr_scaling", "linear", "scaled linearly with the global batch size"),
    ("meta-dinov2-giant", "stages.pretrain.optim.schedule", "cosine", "A cosine learning rate scheduler was employed"),
    ("meta-dinov2-giant", "stages.pretrain.optim.warmup_epochs", 10, "with a 10-epoch warmup phase"),
    ("meta-dinov2-giant", "ssl.momentum_start", 0.996, "linearly increased from 0.996 to 1.0"),
    ("meta-dinov2-giant", "ssl.momentum_end", 1.0, "linearly increased from 0.996 to 1.0"),
    ("meta-dinov2-giant", "ssl.momentum_schedule", "linear", "linearly increased from 0.996 to 1.0"),
    ("meta-dinov2-giant", "stages.pretrain.precision", "fp16", "Mixed-precision training (FP16) was enabled"),
    ("meta-dinov2-giant", "claims.duration_days", 30, "approximately <training>30 days</training>"),
    ("meta-dinov2-giant", "stages.pretrain.steps", 1_500_000, "accumulating over 1.5 million training iterations"),
    ("meta-dinov2-giant", "claims.iterations", 1_500_000, "accumulating over 1.5 million training iterations"),
    ("meta-dinov2-giant", "stages.pretrain.optim.clip_grad", 1.0, "Gradient clipping at a maximum L2 norm of 1.0"),
    ("meta-dinov2-giant", "claims.knn_top1", None, "Meta-DINOv2-Giant"),  # 003 states no k-NN result
    # 004 dinov2-giant
    ("dinov2-giant", "paper.seed", "004", "DINOv2-Giant"),
    ("dinov2-giant", "claims.params_millions", 1100, "<params>1.1 billion parameters</params>"),
    ("dinov2-giant", "model.timm_name", "vit_giant_patch14_dinov2", "leveraging a ViT-G/14 backbone"),
    ("dinov2-giant", "hardware.gpus", 128, "distributed across <gpu_count>128</gpu_count> accelerators"),
    ("dinov2-giant", "stages.pretrain.optim.schedule", "cosine", "AdamW optimizer with a cosine learning rate scheduler"),
    ("dinov2-giant", "stages.pretrain.optim.lr", 1e-4, "peaking at 1e-4"),
    ("dinov2-giant", "stages.pretrain.optim.lr_scaling", "none", "peaking at 1e-4"),
    ("dinov2-giant", "stages.pretrain.optim.warmup_epochs", 10, "a linear warmup phase of 10 epochs"),
    ("dinov2-giant", "stages.pretrain.batch.global_batch", 2048, "A global batch size of 2048 was maintained"),
    ("dinov2-giant", "stages.pretrain.data.resolution", 224, "a context length of 224x224 pixels"),
    ("dinov2-giant", "stages.pretrain.precision", "bf16", "Mixed-precision training (bfloat16) was utilized"),
    ("dinov2-giant", "stages.pretrain.data.dataset", "uncurated-142m", "142 million diverse, uncurated images, totaling approximately 1.2 terabytes"),
    ("dinov2-giant", "stages.pretrain.checkpoint_every_steps", 5000, "model checkpoints were saved every 5,000 steps"),
    ("dinov2-giant", "eval.knn_every_steps!=None", True, "intermediate evaluation on downstream tasks was performed"),
    ("dinov2-giant", "eval.suites[knn]", True, "the average k-NN classification accuracy on ImageNet-1k validation set"),
    ("dinov2-giant", "claims.knn_top1", 78.5, "achieving a 78.5% k-NN accuracy"),
    ("dinov2-giant", "claims.duration_days", 42, "spanned <training>approximately 6 weeks</training>"),
    ("dinov2-giant", "claims.year", 2023, "concluding in <year>2023</year>"),
]


def _get(data: Any, path: str) -> Any:
    """A recipe field by dotted path, with three small operators the table needs:
    `a.b[x]` (x in the list a.b), `a.b!=None`, `a.b>1`, and `x.micro_batch×grad_accum` (the per-GPU batch)."""
    if path.endswith("!=None"):
        return _get(data, path.removesuffix("!=None")) is not None
    if path.endswith(">1"):
        return _get(data, path.removesuffix(">1")) > 1
    if m := re.fullmatch(r"(.+)\[(\w+)\]", path):
        items = _get(data, m[1])
        return m[2] in [str(i) for i in items]
    if path.endswith("micro_batch×grad_accum"):
        batch = _get(data, path.removesuffix(".micro_batch×grad_accum"))
        return batch["micro_batch"] * batch["grad_accum"]
    node = data
    for key in path.split("."):
        if key == "grad_accum" and isinstance(node, dict) and node.get("grad_accum") is None:
            return _derived_accum(data, path)
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _derived_accum(data: dict, path: str) -> int:
    stage = path.split(".")[1]
    b = data["stages"][stage]["batch"]
    return b["global_batch"] // (b["micro_batch"] * data["hardware"]["gpus"])


@pytest.mark.parametrize(("rid", "path", "expected", "quote"), FACTS, ids=[f"{r}:{p}" for r, p, _, _ in FACTS])
def test_recipe_carries_the_paper_fact(rid, path, expected, quote):
    got = _get(load_recipe(rid).model_dump(mode="json"), path)
    if isinstance(expected, float):
        assert got == pytest.approx(expected), f"{rid} {path}: paper says {quote!r}"
    else:
        assert got == expected, f"{rid} {path}: paper says {quote!r}"


def _paper(rid: str) -> str:
    (path,) = SEEDS_DIR.glob(f"{SEED_OF[rid]}_*.txt")
    return " ".join(path.read_text().split())


needs_papers = pytest.mark.skipif(not SEEDS_DIR.is_dir(), reason=f"the seed papers are not at {SEEDS_DIR}")


@needs_papers
@pytest.mark.parametrize("rid", list_recipes())
def test_every_quote_is_in_its_paper(rid):
    text = _paper(rid)
    recipe = load_recipe(rid)
    quotes = [q for r, _, _, q in FACTS if r == rid] + [a.quote for a in recipe.ambiguous]
    missing = [q for q in quotes if " ".join(q.split()) not in text]
    assert not missing, f"{rid}: not in paper {SEED_OF[rid]}: {missing}"


def test_seed_ids_match_the_recipe_files():
    assert {rid: load_recipe(rid).paper.seed for rid in list_recipes()} == SEED_OF


def test_every_recipe_has_facts_and_unstated_values_have_a_reason():
    for rid in list_recipes():
        assert sum(r == rid for r, *_ in FACTS) >= 10, rid
        recipe = load_recipe(rid)
        for key in recipe.provenance:  # a provenance key names a real field (or section)
            assert _get(recipe.model_dump(mode="json"), key) is not None or key.startswith("eval."), f"{rid}: {key}"
