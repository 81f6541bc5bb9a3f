"""vfm's KFP components, one folder each (`components/<name>/component.py`, as kubeflow/pipelines-components
lays them out). Each is a thin `@dsl.component` whose body calls `vfm.pipeline.steps`; the pipelines
import them as `components.<name>.component` (vfm.pipeline.dag)."""
