"""Dense downstream transfer from a vfm ViT backbone: COCO-style detection / instance segmentation (ViTDet's
simple feature pyramid under torchvision's Mask R-CNN) and ADE20K-style semantic segmentation (DINOv2's linear
protocol, a semantic-FPN head, mmseg's sliding-window inference). The model half lives in `vfm.dense.models`."""
