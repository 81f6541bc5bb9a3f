"""Evaluation: top-1/5, ImageNet-C mCE, ImageNet-R, k-NN, seed aggregation, MLflow results, compare."""
