"""Standard sizes of the datasets the recipes name (train split unless stated).

Sources: ../shared/notes/recipes.md §6 (ImageNet archives), DINOv2 paper Table 15 (LVD-142M).
Used by `vfm plan` for steps per epoch when a stage does not set `num_samples`.
"""

DATASET_SIZES: dict[str, int] = {
    "in22k-fall11": 14_197_122,  # fall11_whole.tar, 21,841 synsets
    "in21k-winter21": 13_153_500,  # winter21_whole.tar.gz, 19,167 synsets
    "in1k": 1_281_167,  # ILSVRC2012_img_train.tar
    "in1k-val": 50_000,
    "lvd142m": 142_109_386,  # DINOv2 curated mix
    "imagenet-r": 30_000,
    "synthetic": 512,  # the smoke profile's learnable synthetic set
}

NUM_CLASSES: dict[str, int] = {
    "in22k-fall11": 21_841,
    "in21k-winter21": 19_167,
    "in1k": 1_000,
    "lvd142m": 0,  # unlabelled
    "imagenet-r": 200,
    "synthetic": 10,
}
