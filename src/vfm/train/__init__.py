"""Supervised pretraining / fine-tuning trainer and the loop shared with the DINOv2 trainer.

- `task`: the `Task` protocol (what is trained) — implemented by `supervised.SupervisedTask` and `vfm.ssl`;
- `loop`: `train(task, RunSpec)` — the update loop, resume, checkpoints, SIGTERM, NaN stop, MLflow, export;
- `dist` (process group from the torchrun / PyTorchJob env), `parallel` (DDP / FSDP2 / speed switches),
  `optim` (timm param groups, per-update schedules), `checkpoint` (DCP + completion marker, local or S3),
  `signals` (SIGTERM → 143), `launch` (torchrun with meaningful exit codes), `cli` (`vfm train`).
"""
