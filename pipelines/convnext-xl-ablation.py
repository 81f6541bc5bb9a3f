"""KFP pipeline of paper 002's kernel-size × expansion-ratio ablation (the `convnext-xl` recipe's `ablation:`),
generated from the recipe by vfm.pipeline.dag.

convnext-xl-ablation: shard the IN-1K subset (train + val) → ParallelFor(cells × seeds): pretrain the small
variant at the cell's kernel and MLP ratio → evaluate in1k → one report (table + top-1 heatmap)

Compile:  vfm pipeline compile convnext-xl-ablation     (or: kfp dsl compile --py pipelines/convnext-xl-ablation.py --function pipeline --output pipelines/convnext-xl-ablation.yaml)
Submit:   kfp --endpoint URL run create -e vfm-convnext-xl-ablation -f pipelines/convnext-xl-ablation.yaml profile=paper
Locally:  vfm pipeline run convnext-xl-ablation --local --profile smoke
"""

from vfm.pipeline.dag import build_pipeline

pipeline = build_pipeline("convnext-xl-ablation")

if __name__ == "__main__":
    from pathlib import Path

    from kfp import compiler

    compiler.Compiler().compile(pipeline, str(Path(__file__).with_suffix(".yaml")))
