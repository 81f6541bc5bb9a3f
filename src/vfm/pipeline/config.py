"""Defaults shared by the components and pipelines (compile-time constants)."""

# KFP cannot take a component's image from a run parameter, so the components image is fixed when the
# pipelines are compiled; its tag must move with the code it contains (images/components/Dockerfile).
COMPONENTS_IMAGE = "ghcr.io/vfm-project/vfm-components:0.1.0"
TRAINER_IMAGE = "ghcr.io/vfm-project/vfm-trainer:0.1.0"
MLFLOW_URI = "http://mlflow.vfm.svc.cluster.local:5000"
CREDENTIALS_SECRET = "vfm-credentials"
RAW_DATA_PVC = "vfm-raw-datasets"
RAW_DATA_MOUNT = "/datasets"
