"""Supervised pretraining / fine-tuning trainer and the loop shared with the DINOv2 trainer.

`task.Task` is the contract; `loop.train` runs any task under torchrun (DDP/FSDP2, checkpoints, resume).
"""
