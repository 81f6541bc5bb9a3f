"""Typed recipe configuration.

A recipe is the paper's training setup as data: model, per-stage data/augmentation/optimisation,
hardware, evaluation plan and the paper's claims. Claims are kept apart from what vfm computes
(`vfm plan`, evaluation). Where the paper and its upstream code disagree, the paper's value is the
field value and the upstream value is recorded in `upstream` (see `UpstreamNote`).

Every model forbids unknown fields and validates types strictly enough that a typo in a YAML file or
in `--set a.b=value` fails with the field's path instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vfm.recipes.derive import grad_accum

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    timm_name: str
    """Name in timm's registry, e.g. `vit_huge_patch14_224`."""
    kwargs: dict[str, int | float | str | bool] = Field(default_factory=dict)
    """Architecture overrides passed to `timm.create_model` (e.g. patch_size=16, img_size=512)."""
    family: Literal["vit", "convnext"] = "vit"


class AugmentConfig(_Strict):
    """Training-time augmentation. Field names follow timm's `transforms_imagenet_train`/`Mixup`."""

    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float | None = 0.4
    force_color_jitter: bool = False
    """timm drops colour jitter when RandAugment is on unless forced; some papers use both."""
    rand_augment: str | None = None
    """timm RandAugment string, e.g. `rand-m9-mstd0.5`."""
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    random_erase: float = 0.0
    """timm's `re_prob`."""
    re_mode: Literal["const", "rand", "pixel"] = "pixel"
    """What an erased box is filled with: `pixel` = per-pixel normal noise, as DeiT and ConvNeXt train
    (timm train.py `--remode pixel`); `const` (zeros) is `transforms_imagenet_train`'s own default."""
    re_count: int = Field(1, ge=1)
    """Boxes erased per image at most (timm `--recount`)."""
    interpolation: str = "bicubic"


class MultiCropConfig(_Strict):
    """DINOv2 multi-crop: global crops see the teacher, local crops only the student."""

    global_crops_count: int = Field(2, ge=1)
    global_crops_size: int = 224
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_count: int = Field(8, ge=0)
    local_crops_size: int = 98
    local_crops_scale: tuple[float, float] = (0.05, 0.32)


class DataConfig(_Strict):
    dataset: str
    """Dataset id, one of `vfm.recipes.datasets.DATASET_SIZES` (e.g. in22k-fall11, in1k, curated-1.2b) or folder."""
    resolution: int = Field(224, ge=8)
    crop_pct: float = Field(0.875, gt=0, le=1.0)
    """Eval transform: resize to resolution/crop_pct, centre-crop resolution."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    multicrop: MultiCropConfig | None = None
    workers: int | None = Field(None, ge=0)
    """Loader worker processes per rank (JPEG decode + augmentation); None derives them from the job's CPU
    request per GPU (`vfm.launch.job.loader_workers`)."""


class OptimConfig(_Strict):
    name: Literal["adamw"] = "adamw"
    lr: float | None = Field(None, gt=0)
    """Absolute peak learning rate at the recipe's global batch. Exactly one of lr / base_lr."""
    base_lr: float | None = Field(None, gt=0)
    """Peak learning rate at `base_batch`; scaled by `lr_scaling` to the actual global batch."""
    base_batch: int = 256
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = Field(0.05, ge=0)
    weight_decay_end: float | None = None
    """Cosine weight-decay schedule end value (DINOv2); None keeps it constant."""
    layer_decay: float | None = None
    """Layer-wise lr decay for fine-tuning (timm `param_groups_layer_decay`)."""
    warmup_steps: int | None = Field(None, ge=0)
    warmup_epochs: float | None = Field(None, ge=0)
    warmup_lr_init: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr: float = Field(1e-6, ge=0)
    """Where the cosine ends; 0 for a paper's "decaying to zero"."""
    clip_grad: float | None = Field(None, gt=0)
    patch_embed_lr_mult: float = 1.0

    @model_validator(mode="after")
    def _one_lr(self) -> OptimConfig:
        if (self.lr is None) == (self.base_lr is None):
            raise ValueError("set exactly one of `lr` (absolute) or `base_lr` (scaled with lr_scaling)")
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ValueError("set at most one of `warmup_steps` or `warmup_epochs`")
        return self

    def peak_lr(self, global_batch: int) -> float:
        """The lr at `global_batch` after the scaling rule (DINOv2: sqrt w.r.t. 1024; DeiT: linear w.r.t. 256)."""
        if self.lr is not None:
            return self.lr
        assert self.base_lr is not None
        ratio = global_batch / self.base_batch
        return {"none": self.base_lr, "linear": self.base_lr * ratio, "sqrt": self.base_lr * ratio**0.5}[
            self.lr_scaling
        ]


class BatchConfig(_Strict):
    global_batch: int = Field(ge=1)
    micro_batch: int = Field(ge=1)
    """Samples per GPU per forward/backward."""
    grad_accum: int | None = Field(None, ge=1)
    """Micro-steps per optimiser update; None derives global / (micro × world size)."""


class SSLConfig(_Strict):
    """DINOv2 self-distillation settings."""

    momentum_start: float = 0.994
    momentum_end: float = 1.0
    momentum_schedule: Literal["cosine", "linear"] = "cosine"
    teacher_temp_start: float = 0.04
    teacher_temp_end: float = 0.07
    teacher_temp_warmup_epochs: float = 30
    student_temp: float = 0.1
    centering: Literal["centering", "sinkhorn_knopp"] = "sinkhorn_knopp"
    center_momentum: float = 0.9
    head_prototypes: int = 65536
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_layers: int = 3
    ibot: bool = True
    ibot_separate_head: bool = False
    ibot_prototypes: int = 65536
    ibot_bottleneck: int = 256
    ibot_loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    koleo: bool = True
    koleo_loss_weight: float = 0.1
    freeze_last_layer_epochs: float = 1
    epoch_length_steps: int | None = 1250
    """DINOv2's fixed "epoch" of iterations, unrelated to dataset size."""


class StageConfig(_Strict):
    data: DataConfig
    batch: BatchConfig
    optim: OptimConfig
    epochs: float | None = Field(None, gt=0)
    steps: int | None = Field(None, gt=0)
    """Total optimiser updates; alternative to epochs."""
    drop_path: float = Field(0.0, ge=0, lt=1)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    parallelism: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    """`hsdp`: FSDP2 on a 2-D mesh, parameters sharded within `hsdp_shard_size` ranks (a node) and
    replicated across the groups, so only the gradient all-reduce crosses nodes."""
    hsdp_shard_size: int | None = Field(None, ge=1)
    """Ranks per shard group under `hsdp`; None = the GPUs of one node."""
    activation_checkpointing: bool = False
    compile: bool = False
    """torch.compile each block in place (vfm.train.parallel.apply_speed_switches)."""
    channels_last: bool | None = None
    """NHWC activations and weights; None: on for ConvNeXt on CUDA (its depthwise convs are faster in NHWC)."""
    ema: float | None = None
    """Model EMA decay (ConvNeXt fine-tune evaluates the EMA); None disables."""
    head_init_scale: float | None = None
    seeds: list[int] = Field(default_factory=lambda: [0])
    checkpoint_every_steps: int = Field(1000, ge=1)
    async_checkpoint: bool = False
    """Periodic checkpoints with `dcp.async_save`: training goes on while they are written (the last one,
    and one on SIGTERM, are written before the process goes on or exits)."""
    keep_checkpoints: int = Field(3, ge=1)
    num_samples: int | None = None
    """Samples per epoch; None takes the dataset's standard size (vfm.recipes.datasets)."""

    @model_validator(mode="after")
    def _duration(self) -> StageConfig:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("set exactly one of `epochs` or `steps`")
        return self


class HardwareConfig(_Strict):
    gpu: str = "H100-SXM-80GB"
    gpus: int = Field(8, ge=1)
    gpus_per_node: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _whole_nodes(self) -> HardwareConfig:
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ValueError(
                f"gpus={self.gpus} is not a whole number of nodes of gpus_per_node={self.gpus_per_node}; "
                "use a multiple of gpus_per_node"
            )
        return self

    @property
    def nodes(self) -> int:
        return max(1, -(-self.gpus // self.gpus_per_node))

    @property
    def procs_per_node(self) -> int:
        return min(self.gpus, self.gpus_per_node)


class EvalConfig(_Strict):
    suites: list[Literal["in1k", "in_c", "in_r", "knn"]] = Field(default_factory=lambda: ["in1k"])
    knn_every_steps: int | None = None
    """k-NN of the (teacher) backbone during pretraining every N steps; None disables."""
    knn_k: list[int] = Field(default_factory=lambda: [10, 20, 100, 200])
    knn_temperature: float = 0.07


class PaperConfig(_Strict):
    title: str
    seed: str = Field(pattern=r"^\d{3}$")
    """The seed paper this recipe was transcribed from: its file's first three digits (`000`…`004`)."""


class Claims(_Strict):
    """What the paper says it achieved or did. Never written by vfm; compared against what vfm measures
    (`vfm plan` for params and duration, evaluation for accuracy). Each belongs to the paper that states it."""

    top1: float | None = None
    """IN-1K top-1 (%) after fine-tuning."""
    top1_runs_averaged: int | None = None
    """How many fine-tuning runs the paper's top-1 is the mean of (evaluation reports the seed mean)."""
    knn_top1: float | None = None
    """IN-1K k-NN top-1 (%) of the frozen backbone."""
    params_millions: float | None = None
    duration_days: float | None = None
    """The stated length of pretraining (every seed states it for pretraining only)."""
    duration_text: str | None = None
    iterations: int | None = None
    """Optimiser updates of pretraining, as stated."""
    year: int | None = None
    country: str | None = None


class SlideConfig(_Strict):
    """Sliding-window inference of a segmentation stage (mmsegmentation's `test_cfg=dict(mode="slide")`)."""

    crop: int = Field(ge=8)
    stride: int = Field(ge=1)

    @model_validator(mode="after")
    def _covers(self) -> SlideConfig:
        if self.stride > self.crop:
            raise ValueError(f"slide.stride={self.stride} > slide.crop={self.crop} leaves pixels no window covers")
        return self


DENSE_TASK_OF = {"ade20k": "semantic_segmentation", "coco2017": "object_detection"}
DENSE_HEADS = {"semantic_segmentation": ("linear", "fpn"), "object_detection": ("mask_rcnn", "faster_rcnn")}


class DownstreamStage(StageConfig):
    """A transfer task the paper fine-tunes the pretrained backbone on: a training stage of its own, started from
    the pretraining export, on a dense dataset (`data.dataset`: ade20k or coco2017), with its own head, GPUs,
    schedule, batch and seeds; `vfm train RECIPE --stage NAME` trains it like any stage."""

    task: Literal["object_detection", "semantic_segmentation"]
    head: Literal["linear", "fpn", "mask_rcnn", "faster_rcnn"]
    """`linear`: BN + 1x1 conv on frozen patch tokens (DINOv2's linear protocol); `fpn`: ViTDet's simple feature
    pyramid + a semantic-FPN head, fine-tuned end to end; `mask_rcnn` / `faster_rcnn`: torchvision's detector on
    the simple feature pyramid (vfm.dense.models)."""
    gpus: int = Field(8, ge=1)
    """GPUs of this stage's job (a transfer run is smaller than pretraining)."""
    freeze_backbone: bool = False
    slide: SlideConfig | None = None
    """Segmentation: sliding-window evaluation of whole val images; None evaluates each image at `resolution`."""
    fpn_channels: int = Field(256, ge=8)
    anchor_sizes: list[int] | None = None
    """Detection: one anchor size (px) per pyramid level, stride 4 to 64; None scales ViTDet's 32..512 at 1024 px
    to the resolution."""
    roi_batch_per_image: int = Field(512, ge=8)
    """Detection: RoIs sampled per image for the box head's loss (detectron2's and torchvision's 512)."""

    @model_validator(mode="after")
    def _consistent(self) -> DownstreamStage:
        want = DENSE_TASK_OF.get(self.data.dataset)
        if want is None:
            raise ValueError(f"data.dataset={self.data.dataset!r}: a downstream stage trains on one of "
                             f"{', '.join(DENSE_TASK_OF)}")
        if want != self.task:
            raise ValueError(f"task={self.task} on {self.data.dataset}, which is a {want} dataset")
        if self.head not in DENSE_HEADS[self.task]:
            raise ValueError(f"head={self.head} is not a {self.task} head; use one of {', '.join(DENSE_HEADS[self.task])}")
        if self.head == "linear" and not self.freeze_backbone:
            raise ValueError("head=linear is the frozen-backbone protocol: set freeze_backbone: true (or head: fpn)")
        if self.anchor_sizes is not None and len(self.anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes={self.anchor_sizes}: give one size per pyramid level (5: strides 4..64)")
        if self.slide is not None and self.task != "semantic_segmentation":
            raise ValueError("slide applies to semantic_segmentation stages only")
        if self.parallelism != "ddp":
            raise ValueError(f"parallelism={self.parallelism}: downstream stages train with ddp (a dense model's "
                             "heads are not FSDP2-sharded by vfm)")
        return self


class AblationSubset(_Strict):
    """A deterministic subset of IN-1K train: `num_classes` classes drawn with `seed` (or the `classes` listed),
    `fraction` of each."""

    num_classes: int = Field(100, ge=2, le=1000)
    fraction: float = Field(1.0, gt=0, le=1.0)
    seed: int = 0
    classes: list[str] = Field(default_factory=list)
    """Explicit wnids instead of a seeded draw (e.g. a published 100-class list); `num_classes` must match
    (it follows the list when the subset is given without it)."""

    @model_validator(mode="before")
    @classmethod
    def _size_of_the_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("classes") and "num_classes" not in data:
            return {**data, "num_classes": len(data["classes"])}
        return data

    @model_validator(mode="after")
    def _class_list(self) -> AblationSubset:
        if not self.classes:
            return self
        dupes = sorted({c for c in self.classes if self.classes.count(c) > 1})
        if dupes:
            raise ValueError(f"ablation.subset.classes lists {dupes[:5]} more than once")
        if self.num_classes != len(self.classes):
            raise ValueError(f"ablation.subset.num_classes={self.num_classes} but ablation.subset.classes lists "
                             f"{len(self.classes)}; set num_classes={len(self.classes)} too, or replace the subset "
                             "whole (--set 'ablation.subset={classes: [...], fraction: 1.0}')")
        return self


class AblationConfig(_Strict):
    """A grid of smaller variants trained on an IN-1K subset (paper 002: kernel size × expansion ratio).
    Each cell is `variant` built through timm's ConvNeXt `kernel_sizes` and `mlp_ratio` arguments."""

    variant: str
    """A timm ConvNeXt, e.g. `convnext_tiny`."""
    kernel_sizes: list[int] = Field(min_length=1)
    mlp_ratios: list[float] = Field(min_length=1)
    subset: AblationSubset = Field(default_factory=AblationSubset)
    resolution: int = Field(224, ge=8)
    epochs: float = Field(gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    metrics: list[Literal["top1", "top5"]] = Field(default_factory=lambda: ["top1", "top5"])
    gpus: int = Field(8, ge=1)
    """Each cell's job: this many GPUs (of `hardware.gpus_per_node`); the cells run side by side."""
    micro_batch: int = Field(128, ge=1)
    """Per-GPU batch of a cell; the global batch stays the pretraining stage's (accumulation makes it)."""
    drop_path: float = Field(0.1, ge=0, lt=1)
    concurrent_cells: int = Field(4, ge=1)
    """How many cells train at once (`dsl.ParallelFor(parallelism=...)`)."""

    @model_validator(mode="after")
    def _odd_kernels(self) -> AblationConfig:
        bad = [k for k in self.kernel_sizes if k < 1 or k % 2 == 0]
        if bad:
            raise ValueError(f"ablation.kernel_sizes {bad}: depthwise kernels must be odd and ≥ 1 (same padding)")
        if any(r <= 0 for r in self.mlp_ratios):
            raise ValueError(f"ablation.mlp_ratios {self.mlp_ratios}: expansion ratios must be > 0")
        return self


class CurateSource(_Strict):
    """One input of `vfm curate` (vfm.curate.inputs reads each kind), named and weighted."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    """Names the source in the report and in every output sample's json (`source`)."""
    kind: Literal["folder", "tar", "wds", "in22k", "openimages"]
    """folder: image files under a directory or `s3://` prefix (any depth; tars met there are read too); tar: a tar
    (or a directory of tars) of images; wds: shards of `vfm shard` / `vfm curate` (their manifest); in22k: the
    official fall11_whole.tar (tar of per-wnid tars, the wnid kept in each sample's json); openimages: a folder of
    `<ImageID>.jpg` with the image-id CSV of the release (`ids_csv`)."""
    path: str
    """Absolute, `s3://`, or relative to the raw-data volume (the pipeline's `/mnt/raw`)."""
    weight: float = Field(1.0, gt=0)
    """Expected copies in the output of each image of this source that survives curation: 1 as is, 0.5 keeps a
    seeded half, 2 writes each twice. A duplicate across sources keeps the copy of the heavier source."""
    ids_csv: str | None = None
    """openimages: the CSV whose `ImageID` column lists the images (e.g. train-images-boxable-with-rotation.csv)."""
    seed_set: bool = False
    """Retrieval (`embedding.retrieval_k` > 0): this source is a curated seed set; the others only keep images among
    the k nearest neighbours of its images (DINOv2's LVD-142M retrieval)."""

    @model_validator(mode="after")
    def _csv(self) -> CurateSource:
        if (self.kind == "openimages") != (self.ids_csv is not None):
            raise ValueError(f"source {self.name}: `ids_csv` is for (and required by) kind openimages")
        return self


class QualityStage(_Strict):
    """Stage 1: decode, then drop what fails a threshold (vfm.curate.quality.quality_reason reads these fields).

    Defaults were tuned on the planted pool of tests/helpers/curate_data.py so each planted bad image is
    rejected for its own reason while no original or planted copy is (make_pool(originals=60, seed=0):
    over the 108 good files the smallest values were short side 137 px, 7.9 KB, entropy 5.7 bits and
    Laplacian variance 68; the planted blurry image measures 1.6 and the near-constant one 1.6 bits):
    - min_side 112: half of the 224 px training crop; below it a crop is mostly upsampling.
    - max_aspect 3.0: a 224 crop of a 3:1 panorama still sees a third of it; banners and strips go.
    - min_bytes 2048: real photos at >= 112 px are several KB even as JPEG; smaller files are placeholders.
    - min_entropy 3.0 bits (of 8): flat fills, blank scans and near-constant frames sit near 0-2 bits,
      natural photos at 6-7.5.
    - min_laplacian_var 30: the OpenCV "variance of the Laplacian" blur test (Pech-Pacheco et al. 2000;
      popularised by pyimagesearch's "Blur detection with OpenCV", which uses cv2.Laplacian(gray,
      CV_64F).var() < 100 on full-resolution frames). We measure on a 256 px thumbnail, which sharpens
      (downscaling raises the variance), with the same 4-neighbour kernel as cv2.Laplacian's default
      ksize=1; 30 rejects heavy defocus/motion blur but keeps soft photos.
    - drop_grayscale False: DINOv2's LVD-142M does not report dropping grayscale photos; they are valid
      natural images, so removing them is opt-in.
    """

    enabled: bool = True
    min_side: int = Field(112, ge=1)
    max_aspect: float = Field(3.0, ge=1.0)
    min_bytes: int = Field(2048, ge=0)
    min_entropy: float = Field(3.0, ge=0)
    """Bits of the grey-level histogram; a near-constant image is close to 0."""
    min_laplacian_var: float = Field(30.0, ge=0)
    """Variance of the Laplacian of the grey image at 256 px short side: the usual blur measure."""
    drop_grayscale: bool = False


class ExactStage(_Strict):
    """Stage 2: the same decoded pixels (sha256) kept once."""

    enabled: bool = True


class NearStage(_Strict):
    """Stage 3: perceptual-hash near duplicates, found through multi-index hashing (vfm.curate.hashing): a pair is
    within `phash_max_distance` bits of pHash or `dhash_max_distance` of dHash. Both: an opaque strip over an image
    moves its pHash by 8-24 bits but its dHash by 0-6 (measured on tests/helpers/curate_data.py's watermarks)."""

    enabled: bool = True
    hash_size: int = Field(8, ge=4)
    """ImageHash's hash_size: hash_size² bits."""
    phash_max_distance: int = Field(10, ge=-1)
    """-1: pHash not used."""
    dhash_max_distance: int = Field(6, ge=-1)
    """-1: dHash not used."""
    chunk_bits: int = Field(16, ge=4, le=32)
    """Multi-index hashing's substring length: candidates grow as N² × probes / 2^chunk_bits (vfm plan estimates
    them for the recipe's images)."""

    @model_validator(mode="after")
    def _chunks(self) -> NearStage:
        if (self.hash_size ** 2) % self.chunk_bits:
            raise ValueError(f"near.chunk_bits={self.chunk_bits} must divide the hash's {self.hash_size ** 2} bits")
        return self


class EmbeddingStage(_Strict):
    """Stage 4: embedding near duplicates above a cosine threshold (faiss), and optional retrieval around seed sets."""

    enabled: bool = True
    model: str = "timm:vit_huge_patch14_224.orig_in21k"
    """`timm:<name>.<pretrained tag>` (that tag's weights from the timm hub), `timm:<name>` (randomly initialised:
    smoke runs, which cannot download), or the URL of a vfm export."""
    image_size: int = Field(224, ge=16)
    threshold: float = Field(0.6, gt=0, le=1)
    """Cosine similarity at or above which two images are copies."""
    k: int = Field(64, ge=1)
    """Neighbours searched per image."""
    index: Literal["auto", "flat", "ivfpq"] = "auto"
    """auto: exact (flat) up to a million vectors, IVF-PQ above (vfm.curate.embed.build_index)."""
    retrieval_k: int = Field(0, ge=0)
    """> 0: keep only the pool images among the k nearest neighbours of a `seed_set` source's images."""


class DecontaminateStage(_Strict):
    """Stage 5: remove every pool image that is a copy of an evaluation image: the same pixels, within the near
    stage's hash distances, or (with the embedding stage on) at or above `threshold` cosine."""

    enabled: bool = True
    sets: list[CurateSource] = Field(default_factory=list)
    """The evaluation sets (IN-1K val, ImageNet-R; ImageNet-C is made from IN-1K val, so its sources are IN-1K val)."""
    threshold: float = Field(0.45, gt=0, le=1)
    """Cosine similarity (with the embedding stage's model) at or above which it is one."""

    @model_validator(mode="after")
    def _sets(self) -> DecontaminateStage:
        if self.enabled and not self.sets:
            raise ValueError("curate.decontaminate is enabled with no `sets`: name the evaluation sets, or disable it")
        return self


class CurateConfig(_Strict):
    """`vfm curate`: sources → quality filter → decontamination → exact, near and embedding dedup → WebDataset shards
    + manifest (unlabelled) + a curation report in MLflow. Every stage is optional; each counts what it removes."""

    dataset: str
    """The output's dataset name (the pretraining stage's `data.dataset`)."""
    sources: list[CurateSource] = Field(min_length=1)
    quality: QualityStage = Field(default_factory=QualityStage)
    exact: ExactStage = Field(default_factory=ExactStage)
    near: NearStage = Field(default_factory=NearStage)
    embedding: EmbeddingStage = Field(default_factory=EmbeddingStage)
    decontaminate: DecontaminateStage = Field(default_factory=lambda: DecontaminateStage(enabled=False))
    seed: int = 0
    shard_size: str = "1GB"
    part_size: int = Field(4096, ge=1)
    """Images per unit of work: a Ray task analyses one part and commits its features; a rerun skips committed parts."""
    workers: int = Field(64, ge=1)
    """Ray workers on a cluster (the RayJob's worker group); locally the CPUs Ray is given."""
    cpus_per_worker: int = Field(16, ge=1)
    gpus_per_worker: int = Field(0, ge=0)
    """GPUs of each Ray worker, for the embedding model (0: it runs on the workers' CPUs)."""
    memory_per_worker: str = "64Gi"

    @model_validator(mode="after")
    def _names(self) -> CurateConfig:
        names = [s.name for s in self.sources] + [s.name for s in self.decontaminate.sets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"curate: source names must be unique; {dupes} appear more than once")
        if self.embedding.retrieval_k and not any(s.seed_set for s in self.sources):
            raise ValueError("curate.embedding.retrieval_k > 0 needs a source with `seed_set: true`")
        if self.embedding.retrieval_k and not self.embedding.enabled:
            raise ValueError("curate.embedding.retrieval_k > 0 needs the embedding stage enabled")
        return self


class UpstreamNote(_Strict):
    """A place where the paper and the upstream code disagree (or the paper is ambiguous)."""

    field: str
    paper: str
    upstream: str
    source: str


class Ambiguity(_Strict):
    """A sentence of the paper that admits more than one setting: the reading the recipe uses, and the other."""

    field: str
    quote: str
    """The paper's words."""
    chosen: str
    other: str
    why: str


class Recipe(_Strict):
    id: str
    title: str
    paper: PaperConfig
    model: ModelConfig
    stages: dict[Literal["pretrain", "finetune"], StageConfig]
    ssl: SSLConfig | None = None
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    claims: Claims = Field(default_factory=Claims)
    downstream: dict[str, DownstreamStage] = Field(default_factory=dict)
    """Transfer stages the paper runs after pretraining, by name (`ade20k`, `coco`): each is trained from the
    pretraining export once per seed and evaluated on its dataset's val split."""
    ablation: AblationConfig | None = None
    curate: CurateConfig | None = None
    """How the pretraining data is made from raw image pools (`vfm curate`, a pipeline step before pretraining)."""
    upstream: list[UpstreamNote] = Field(default_factory=list)
    ambiguous: list[Ambiguity] = Field(default_factory=list)
    provenance: dict[str, str] = Field(default_factory=dict)
    """Field path → why it has its value when the seed paper is silent (a vfm default or addition)."""
    profile: Literal["paper", "smoke"] = "paper"

    @model_validator(mode="after")
    def _batches(self) -> Recipe:
        for name, stage in self.stages.items():
            b = stage.batch
            grad_accum(b, self.hardware.gpus, f"stages.{name}")  # the paper's world size must make its batch
            if stage.data.augment.mixup or stage.data.augment.cutmix:
                if b.micro_batch % 2:
                    raise ValueError(
                        f"stages.{name}.batch.micro_batch={b.micro_batch} must be even with Mixup/CutMix"
                    )
        for name, ds in self.downstream.items():
            if name in self.stages:
                raise ValueError(f"downstream.{name}: a downstream stage cannot share a name with stages.{name}")
            grad_accum(ds.batch, ds.gpus, f"downstream.{name}")  # its own GPUs must make its batch
        if self.downstream and "pretrain" not in self.stages:
            raise ValueError("downstream stages start from the pretraining export: the recipe needs stages.pretrain")
        if self.curate is not None and "pretrain" in self.stages:
            if self.curate.dataset != self.stages["pretrain"].data.dataset:
                raise ValueError(f"curate.dataset={self.curate.dataset!r} must be what stages.pretrain trains on "
                                 f"({self.stages['pretrain'].data.dataset!r})")
        if self.ssl is not None and "pretrain" in self.stages:
            if self.stages["pretrain"].data.multicrop is None:
                raise ValueError("stages.pretrain.data.multicrop is required when `ssl` is set")
        return self

    def stage(self, name: str) -> StageConfig:
        """Stage `name`: `stages.<name>` (pretrain, finetune) or `downstream.<name>` (ade20k, coco)."""
        if name in self.stages:
            return self.stages[name]  # type: ignore[index]
        if name in self.downstream:
            return self.downstream[name]
        raise KeyError(f"recipe {self.id} has no stage `{name}`; it has: {', '.join(self.stage_names)}")

    @property
    def stage_names(self) -> list[str]:
        return [*self.stages, *self.downstream]

    def stage_path(self, name: str) -> str:
        """The field path of stage `name`, for errors and provenance (`stages.pretrain`, `downstream.ade20k`)."""
        return f"downstream.{name}" if name in self.downstream else f"stages.{name}"

    def stated(self, path: str) -> bool:
        """Whether the paper states the field at `path`: it does unless `provenance` marks the field or a
        section above it (e.g. `hardware.gpus`, or `stages.finetune.optim` for all its fields)."""
        return not any(path == key or path.startswith(key + ".") for key in self.provenance)
