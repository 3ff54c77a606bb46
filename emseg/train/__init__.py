"""Training: the loop (loop), annotated pages and crops (data), augmentation on the CPU (augment) and on the
device (augment_device), checkpoints, volume annotations (volume)."""
