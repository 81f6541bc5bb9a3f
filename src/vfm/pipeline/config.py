"""Defaults shared by the components and pipelines (compile-time constants)."""

# KFP cannot take a component's image from a run parameter, so the components image is fixed when the
# pipelines are compiled (`vfm pipeline compile --components-image`); its tag must move with the code it
# contains (images/components/Dockerfile). These are the committed YAML's documented defaults.
COMPONENTS_IMAGE = "ghcr.io/vfm-project/vfm-components:0.1.0"
TRAINER_IMAGE = "ghcr.io/vfm-project/vfm-trainer:0.1.0"
MLFLOW_URI = "http://mlflow.vfm.svc.cluster.local:5000"
CREDENTIALS_SECRET = "vfm-credentials"
# the credentials every step needs; MLflow basic auth is optional (a server without auth has no such keys)
REQUIRED_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# where training jobs run: the namespace manifests/base/rbac.yaml lets the pipeline runner create PyTorchJobs in
JOB_NAMESPACE = "vfm"
PIPELINE_RUNNER_SERVICE_ACCOUNT = "vfm-pipeline-runner"
RAW_DATA_PVC = "vfm-raw-datasets"
RAW_DATA_MOUNT = "/datasets"
