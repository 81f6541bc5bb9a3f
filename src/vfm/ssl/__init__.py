"""DINOv2 self-supervised pretraining as a `Task` of the shared training loop (vfm.train.loop).

heads (DINO head), losses (DINO CLS loss with centering / Sinkhorn-Knopp, iBOT, KoLeo), masking (iBOT
block masks), multicrop (augmentations + collate), schedules (momentum, teacher temperature, last-layer
freeze), model (backbone with mask token, EMA update), task (`DinoTask`).
"""
