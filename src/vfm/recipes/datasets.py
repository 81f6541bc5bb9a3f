"""Standard sizes of the datasets the recipes name (train split unless stated).

ImageNet counts are those of the official archives (fall11_whole.tar, winter21_whole.tar.gz,
ILSVRC2012). The two SSL corpora are the seed papers' own descriptions: paper 003's curated 1.2 B images
and paper 004's 142 M uncurated images; neither is a public archive, so `vfm shard` reads them as a
folder of images. Used by `vfm plan` for steps per epoch when a stage does not set `num_samples`.
"""

DATASET_SIZES: dict[str, int] = {
    "in22k-fall11": 14_197_122,  # fall11_whole.tar, 21,841 synsets ("ImageNet-21K/22K, 14 M, 21,841 classes")
    "in21k-winter21": 13_153_500,  # winter21_whole.tar.gz, 19,167 synsets
    "in1k": 1_281_167,  # ILSVRC2012_img_train.tar
    "in1k-val": 50_000,
    # paper 003: "1.2 billion images, including … ImageNet-22K, Google Open Images, and a substantial
    # proprietary corpus, after extensive deduplication and quality filtering"
    "curated-1.2b": 1_200_000_000,
    # paper 004: "142 million diverse, uncurated images, totaling approximately 1.2 terabytes"
    "uncurated-142m": 142_000_000,
    "imagenet-r": 30_000,
    # the dense transfer sets (paper 001): ADEChallengeData2016 training (CSAILVision/sceneparsing) and COCO
    # train2017 images (cocodataset.org; instances_train2017.json lists 118,287 images)
    "ade20k": 20_210,
    "coco2017": 118_287,
    "synthetic": 512,  # the smoke profile's learnable synthetic set
}

NUM_CLASSES: dict[str, int] = {
    "in22k-fall11": 21_841,
    "in21k-winter21": 19_167,
    "in1k": 1_000,
    "curated-1.2b": 0,  # unlabelled
    "uncurated-142m": 0,  # unlabelled
    "imagenet-r": 200,
    "ade20k": 150,  # SceneParsing's 150 classes; mask value 0 ("other") is ignored
    "coco2017": 80,  # 80 categories, ids 1..90 with gaps
    "synthetic": 10,
}
