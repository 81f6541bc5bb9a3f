"""The parts of DINOv2 self-supervised pretraining: heads (DINO head), losses (DINO CLS loss with
centering / Sinkhorn-Knopp, iBOT, KoLeo), masking (iBOT block masks), multicrop (augmentations +
collate), schedules (momentum, teacher temperature, last-layer freeze) and model (backbone with mask
token, EMA update). The task that trains with them is vfm.tasks.dino; nothing here imports vfm.train.
"""
