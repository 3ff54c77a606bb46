"""Training: the loop (loop), annotated pages and crops (data), augmentation on the CPU (augment) and on the
device (augment_device), checkpoints, volume annotations (volume)."""

#: what `emseg finetune` and the napari Fine-tune widget change of TrainConfig's defaults (docs/training.md,
#: "Fine-tuning that pays": measured on four pairs of data sets). ``lr`` is for the base's own task (the same
#: classes), ``new_task_lr`` for other classes (a fresh head: emseg.train.loop.is_new_task). ``base_share``: how
#: much of the base's weights is averaged into the result when its classes are kept (WiSE-FT; "auto": the share
#: that scores best on the validation pages). Here, free of imports, for the CLI's --help.
FINETUNE_DEFAULTS = {"steps": 500, "lr": 3e-4, "new_task_lr": 1e-3, "base_share": "auto"}
