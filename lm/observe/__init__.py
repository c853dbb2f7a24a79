"""What a run reports: model FLOPs and MFU, metrics logs and TensorBoard, progress, profiles."""
