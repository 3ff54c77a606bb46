"""Train the bundled default model on the synthetic sample with `emseg train`.

Run from the repository root:  python data_samples/train_default.py
It trains in runs/default/ and copies the result (weights stored as float16 to keep the file small)
to emseg/data/default_model.safetensors. Takes about 5-10 minutes on an idle 2-core CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

from emseg.cli import main
from emseg.model.modelfile import default_model_path, load_model

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "runs" / "default"

ARGS = [
    "train",
    "--images", str(ROOT / "data_samples" / "sample_stack.tif"),
    "--masks", str(ROOT / "data_samples" / "sample_masks.tif"),
    "--classes", "background,membrane,mitochondrion",
    "--encoder", "vgg11_bn_slim",
    "--steps", "150", "--val-every", "25", "--batch-size", "8", "--tile-size", "256",
    "--name", "emseg default (synthetic EM sample)",
    "--seed", "0",
    # the bundled model was trained before border weighting became the default for membrane classes;
    # kept off so that this script trains with the bundled model's settings
    "--border-weight", "0",
    # likewise trained before the annotation offset and the moving average of the weights existed
    "--no-label-offset", "--ema-decay", "0",
    # with Dice + cross-entropy
    "--dice-weight", "1",
    # and with smp's own decoder, before the full-resolution skip and bilinear upsampling became the defaults
    "--no-full-resolution-skip", "--decoder-upsampling", "nearest",
    "-o", str(RUN),
]

if __name__ == "__main__":
    code = main(ARGS + sys.argv[1:])
    if code:
        sys.exit(code)
    model = load_model(RUN / "model.safetensors")
    card = model.card.updated(description=(
        "Demonstration model trained by data_samples/train_default.py on the synthetic EM-like sample "
        "(membranes and mitochondria at 6 nm/px). Fine-tune it on your own annotations for real data."))
    target = default_model_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    model.save(target, card, half=True)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")
