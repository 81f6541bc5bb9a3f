"""KFP pipeline of the `convnext-xl` recipe, generated from the recipe by vfm.pipeline.dag.

convnext-xl: pretrain → finetune, seeds [0, 1, 2] of finetune, evaluate in1k, in_c, in_r
(the paper's kernel-size × expansion-ratio ablation is its own pipeline: pipelines/convnext-xl-ablation.py)

Compile:  vfm pipeline compile convnext-xl     (or: kfp dsl compile --py pipelines/convnext-xl.py --function pipeline --output pipelines/convnext-xl.yaml)
Submit:   kfp --endpoint URL run create -e vfm-convnext-xl -f pipelines/convnext-xl.yaml profile=paper
Locally:  vfm pipeline run convnext-xl --local --profile smoke
"""

from vfm.pipeline.dag import build_pipeline

pipeline = build_pipeline("convnext-xl")

if __name__ == "__main__":
    from pathlib import Path

    from kfp import compiler

    compiler.Compiler().compile(pipeline, str(Path(__file__).with_suffix(".yaml")))
