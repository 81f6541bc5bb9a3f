"""The training engine: everything that is the same whatever is trained. It knows no task (the
supervised and DINOv2 tasks live in vfm.tasks and import from here, never the other way round).

- `task`: the `Task` protocol (what is trained) and the `TaskContext` it is built with;
- `setup`: model, speed switches, DDP / FSDP2, optimiser, schedules, grad scaler, loader — built once;
- `loop`: `train(task, RunSpec)` — the update loop, resume, SIGTERM, NaN stop, MLflow, export;
- `checkpoint`: what a checkpoint holds (`TrainState`, RNG) and how it is written (DCP + completion
  marker, local or S3);
- `parallel` (DDP / FSDP2 / speed switches), `optim` (timm param groups, per-update schedules),
  `signals` (SIGTERM → 143), `torchrun` (torchrun with exit codes a PyTorchJob can act on).

The trainer process itself (`vfm train`, `python -m vfm.trainer`) is vfm.trainer.
"""
