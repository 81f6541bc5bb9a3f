"""KFP pipeline of the `dinov2-giant` recipe, generated from the recipe by vfm.pipeline.dag.

dinov2-giant: pretrain, seeds [0] of pretrain, evaluate knn
(in1k not evaluated: needs a classifier; a headless SSL backbone needs a linear probe, which vfm evaluate does not run; in_r not evaluated: needs a classifier; a headless SSL backbone needs a linear probe, which vfm evaluate does not run)

Compile:  vfm pipeline compile dinov2-giant     (or: kfp dsl compile --py pipelines/dinov2-giant.py --function pipeline --output pipelines/dinov2-giant.yaml)
Submit:   kfp --endpoint URL run create -e vfm-dinov2-giant -f pipelines/dinov2-giant.yaml profile=paper
Locally:  vfm pipeline run dinov2-giant --local --profile smoke
"""

from vfm.pipeline.dag import build_pipeline

pipeline = build_pipeline("dinov2-giant")

if __name__ == "__main__":
    from pathlib import Path

    from kfp import compiler

    compiler.Compiler().compile(pipeline, str(Path(__file__).with_suffix(".yaml")))
