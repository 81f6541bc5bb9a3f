"""KFP pipeline of the `vit-huge` recipe, generated from the recipe by vfm.pipeline.dag.

vit-huge: pretrain → finetune, seeds [0, 1, 2] of finetune, evaluate in1k, in_c, in_r, knn

Compile:  vfm pipeline compile vit-huge     (or: kfp dsl compile --py pipelines/vit-huge.py --function pipeline --output pipelines/vit-huge.yaml)
Submit:   kfp --endpoint URL run create -e vfm-vit-huge -f pipelines/vit-huge.yaml profile=paper
Locally:  vfm pipeline run vit-huge --local --profile smoke
"""

from vfm.pipeline.dag import build_pipeline

pipeline = build_pipeline("vit-huge")

if __name__ == "__main__":
    from pathlib import Path

    from kfp import compiler

    compiler.Compiler().compile(pipeline, str(Path(__file__).with_suffix(".yaml")))
