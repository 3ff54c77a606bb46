"""Model files: safetensors weights plus a JSON model card, never a pickle.

Two layouts are read and written:

* a single ``.safetensors`` file whose header metadata holds the card as JSON (key ``emseg.model.card``);
* a folder holding ``card.json`` and ``weights.safetensors``.

Loading rebuilds the network from the card alone, then loads the weights strictly, so a card
that does not match its weights is reported rather than half-loaded.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from emseg.errors import ModelFileError
from emseg.model.card import FORMAT_VERSION, ModelCard
from emseg.model.networks import build_unet

log = logging.getLogger(__name__)

CARD_KEY = "emseg.card"
FOLDER_CARD = "card.json"
FOLDER_WEIGHTS = "weights.safetensors"
RUN_MODEL = "model.safetensors"  # the model of a run folder (`emseg train -o RUN`)
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".bin")


def default_model_path() -> Path:
    """The bundled default model (trained on the synthetic sample by ``data_samples/train_default.py``)."""
    return Path(__file__).parents[1] / "data" / "default_model.safetensors"


class Model:
    """A network with its card; ``predict`` runs seamless tiled inference on pages or stacks."""

    def __init__(self, net: torch.nn.Module, card: ModelCard, path: Path | None = None):
        self.net = net.eval()
        self.card = card
        self.path = path

    @classmethod
    def new(cls, card: ModelCard) -> "Model":
        """A randomly initialised model described by ``card``."""
        return cls(_build(card), card)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.card.classes

    def __repr__(self) -> str:
        where = f" from {self.path}" if self.path else ""
        return f"<emseg Model {self.card.encoder} U-Net, classes {list(self.classes)}{where}>"

    def predictor(self, **options: Any):
        """A :class:`emseg.infer.predictor.Predictor` for this model (keyword options as in ``predict``)."""
        from emseg.infer.predictor import Predictor
        return Predictor(self, **options)

    def predict(
        self,
        image,
        *,
        tile: int | None = None,
        overlap: int | None = None,
        batch_size: int = 4,
        tta: bool = False,
        device: str = "auto",
        pixel_size_nm: float | None = None,
        return_probabilities: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ):
        """Segment a 2D page or a 3D stack (numpy or dask array).

        Args:
            image: ``(H, W)`` or ``(pages, H, W)`` greyscale array.
            tile, overlap: tiling (defaults from the card).
            batch_size: tiles per forward pass.
            tta: average over the 8 flips/rotations.
            device: ``auto`` (CUDA, then MPS, then CPU), or a torch device string.
            pixel_size_nm: the image's pixel size; when the card has one too, the image is rescaled
                to the model's pixel size for inference and the result mapped back.
            return_probabilities: also return per-class probabilities.
            progress: called with ``(pages_done, pages_total)``.

        Returns:
            Class labels with the image's shape (uint8), and with ``return_probabilities`` also a
            float32 array of shape ``(classes, H, W)`` or ``(pages, classes, H, W)``.
        """
        from emseg.io.read import array_source
        source = array_source(image, pixel_size_nm=pixel_size_nm)
        predictor = self.predictor(tile=tile, overlap=overlap, batch_size=batch_size, tta=tta, device=device)
        labels, probs = [], []
        for i, result in enumerate(predictor.iter_pages(source, keep_probabilities=return_probabilities)):
            labels.append(result.labels)
            if return_probabilities:
                probs.append(result.probabilities)
            if progress is not None:
                progress(i + 1, len(source))
        labels_arr = np.stack(labels) if source.is_stack else labels[0]
        if not return_probabilities:
            return labels_arr
        return labels_arr, (np.stack(probs) if source.is_stack else probs[0])

    def save(self, path: str | os.PathLike, card: ModelCard | None = None, *, half: bool = False) -> Path:
        """Write this model (optionally with an updated card) and return the path written."""
        return save_model(self.net, card or self.card, path, half=half)


def _build(card: ModelCard) -> torch.nn.Module:
    if card.architecture != "unet":
        raise ValueError(f"unknown architecture {card.architecture!r}; this emseg builds 'unet'")
    return build_unet(card.encoder, card.out_channels, in_channels=card.in_channels,
                      decoder_channels=card.decoder_channels, full_resolution_skip=card.full_resolution_skip,
                      upsampling=card.decoder_upsampling, regression=card.is_pretrained)


def save_model(net: torch.nn.Module, card: ModelCard, path: str | os.PathLike, *, half: bool = False) -> Path:
    """Write weights and card atomically: a ``.safetensors`` path gives one file, any other path a folder.

    ``half`` stores floating-point weights as float16 (half the size; loading restores float32).
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    from emseg.io.write import _temp_path
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_path(path)
        try:
            save_file(state, str(tmp), metadata={CARD_KEY: card.to_json(), "format": "pt"})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
    path.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c = _temp_path(path / FOLDER_WEIGHTS), _temp_path(path / FOLDER_CARD)
    try:
        save_file(state, str(tmp_w), metadata={"format": "pt"})
        tmp_c.write_text(card.to_json())
        os.replace(tmp_w, path / FOLDER_WEIGHTS)
        os.replace(tmp_c, path / FOLDER_CARD)
    finally:
        tmp_w.unlink(missing_ok=True)
        tmp_c.unlink(missing_ok=True)
    return path


def _read_card_and_weights(path: Path) -> tuple[str, Path]:
    """The card's JSON text and the weights file of a model at ``path``."""
    if path.is_dir():
        card_file, weights = path / FOLDER_CARD, path / FOLDER_WEIGHTS
        if not card_file.is_file() and (path / RUN_MODEL).is_file():  # the run folder of `emseg train -o RUN`
            return _read_card_and_weights(path / RUN_MODEL)
        if not card_file.is_file() or not weights.is_file():
            raise ModelFileError(f"{path}: neither a model folder ({FOLDER_CARD} and {FOLDER_WEIGHTS}) nor a run "
                                 f"folder ({RUN_MODEL}); point at a model written by `emseg train` or "
                                 "`emseg finetune`, or at their -o folder")
        return card_file.read_text(), weights
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ModelFileError(f"{path}: looks like a PyTorch pickle; emseg never unpickles model files "
                             "(unpickling can run arbitrary code). Use an emseg .safetensors model file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not an emseg model file (not readable as safetensors: {exc}). "
                             "Model files are written by `emseg train` and `emseg finetune`") from None
    if CARD_KEY not in meta:
        raise ModelFileError(f"{path}: safetensors file without an emseg model card; it holds weights only. "
                             "Point at a model written by emseg")
    return meta[CARD_KEY], path


def load_card(path: str | os.PathLike) -> ModelCard:
    """Read and check only the card of a model file or folder."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: model file not found")
    text, _ = _read_card_and_weights(path)
    return _parse_card(text, path)


def _parse_card(text: str, path: Path) -> ModelCard:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: model card is not valid JSON ({exc})") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if not isinstance(version, int):
        raise ModelFileError(f"{path}: model card has no format_version; not an emseg model card")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: written by a newer emseg ({data.get('emseg_version', '?')}, model format {version}); "
            f"this emseg reads format {FORMAT_VERSION} and older. Upgrade emseg: pip install -U emseg")
    try:
        return ModelCard.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: model card is malformed: {exc}; use a model file written by emseg "
                             "(or correct the card)") from None


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Model:
    """Load a model file or folder (``"default"``: the bundled model, as the CLI's ``default``): rebuild
    the network from its card, then load its weights strictly."""
    if str(path) == "default" and not Path(path).exists():
        path = default_model_path()
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: model file not found")
    text, weights_file = _read_card_and_weights(path)
    card = _parse_card(text, path)
    try:
        net = _build(card)
    except ValueError as exc:
        raise ModelFileError(f"{path}: the card describes a network this emseg cannot build: {exc}") from None
    try:
        state = load_file(str(weights_file), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{weights_file}: weights cannot be read ({exc}); the file may be truncated") from None
    bad = next((name for name, tensor in state.items()
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)
    if bad is not None:
        raise ModelFileError(f"{weights_file}: weights hold NaN or infinite values (first in {bad}); the model "
                             "cannot segment with them: use an earlier model file, or retrain")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).split("\n", 1)[-1].strip().replace("\n", " ")
        raise ModelFileError(
            f"{path}: the weights do not match the card (encoder {card.encoder}, {card.num_classes} classes): "
            f"{detail[:400]}") from None
    log.debug("loaded %s (%s, classes %s)", path, card.encoder, card.classes)
    return Model(net.to(device), card, path)
