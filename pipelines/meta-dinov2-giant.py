"""KFP pipeline of the `meta-dinov2-giant` recipe, generated from the recipe by vfm.pipeline.dag.

meta-dinov2-giant: pretrain, seeds [0] of pretrain, evaluate knn

Compile:  vfm pipeline compile meta-dinov2-giant     (or: kfp dsl compile --py pipelines/meta-dinov2-giant.py --function pipeline --output pipelines/meta-dinov2-giant.yaml)
Submit:   kfp --endpoint URL run create -e vfm-meta-dinov2-giant -f pipelines/meta-dinov2-giant.yaml profile=paper
Locally:  vfm pipeline run meta-dinov2-giant --local --profile smoke
"""

from vfm.pipeline.dag import build_pipeline

pipeline = build_pipeline("meta-dinov2-giant")

if __name__ == "__main__":
    from pathlib import Path

    from kfp import compiler

    compiler.Compiler().compile(pipeline, str(Path(__file__).with_suffix(".yaml")))
