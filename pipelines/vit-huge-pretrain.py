"""KFP pipeline of the `vit-huge-pretrain` recipe, generated from the recipe by vfm.pipeline.dag.

vit-huge-pretrain: pretrain, seeds [0] of pretrain, evaluate knn
(the paper's COCO object detection and ADE20K semantic segmentation are declared in the recipe, not yet stages)

Compile:  vfm pipeline compile vit-huge-pretrain     (or: kfp dsl compile --py pipelines/vit-huge-pretrain.py --function pipeline --output pipelines/vit-huge-pretrain.yaml)
Submit:   kfp --endpoint URL run create -e vfm-vit-huge-pretrain -f pipelines/vit-huge-pretrain.yaml profile=paper
Locally:  vfm pipeline run vit-huge-pretrain --local --profile smoke
"""

from vfm.pipeline.dag import build_pipeline

pipeline = build_pipeline("vit-huge-pretrain")

if __name__ == "__main__":
    from pathlib import Path

    from kfp import compiler

    compiler.Compiler().compile(pipeline, str(Path(__file__).with_suffix(".yaml")))
