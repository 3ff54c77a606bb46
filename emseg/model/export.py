"""Export an emseg model to run without emseg: TorchScript, ONNX, or a bioimage.io model package.

Tensors of every exported network:

* input ``(N, 1, H, W)`` float32, already normalised as the model card says (see
  :func:`emseg.infer.preprocess.normalize_page`); ``H`` and ``W`` any multiples of 32 (dynamic axes);
* output ``(N, K, H, W)`` float32: per-class probabilities (softmax over the K classes) for the
  TorchScript and ONNX files, or logits with ``probabilities=False``.

The card JSON travels with each export: as the extra file ``emseg_card.json`` in TorchScript, as
the ``emseg_card`` metadata entry in ONNX, and under ``config.emseg.model.card`` in bioimage.io. The
networks do not apply the card's ``label_offset`` (emseg.infer.alignment), the sub-pixel shift emseg gives
its probabilities after inference; exporting a model that has one logs a warning.

The bioimage.io package (format 0.5) carries raw images: its preprocessing reproduces emseg's
normalisation (per-sample percentile range, clip to [0, 1], then ``(x - mean) / std``), its
weights output logits and its postprocessing is a softmax over the channel axis, so a consumer
(ilastik, deepImageJ, bioimageio.core) gets the same probabilities as emseg. Spatial axes carry
the card's pixel size in nanometres. (emseg estimates the percentiles of pages above 1 megapixel
from a regular subsample, the package from all pixels: results on such pages differ slightly.) ONNX and bioimage.io need the ``export`` extra:
``pip install "emseg[export]"``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from emseg.errors import EmsegError, ModelFileError
from emseg.infer.alignment import is_offset
from emseg.io.write import atomic_output

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx", "bioimageio")
INSTALL_HINT = 'pip install "emseg[export]"'
ONNX_OPSET = 17
CLIP = (0.0, 1.0)  # emseg.infer.preprocess.normalize_page clips the percentile-scaled page to this range
CARD_FILE = "emseg_card.json"
UNET_CITATION = ("Ronneberger, Fischer, Brox (2015). U-Net: Convolutional Networks for Biomedical Image "
                 "Segmentation. MICCAI 2015", "10.1007/978-3-319-24574-4_28")


class _Softmax(nn.Module):
    """A network followed by a softmax over the class axis (probabilities out)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


def _preprocessing_text(norm) -> str:
    """The card's normalisation in words (for metadata and documentation)."""
    scale = f"then (x - {norm.mean}) / {norm.std}"
    if norm.method == "none":
        return f"raw values, {scale}"
    return (f"the percentiles {norm.low:g} and {norm.high:g} of each image map to 0 and 1, values are "
            f"clipped to [{CLIP[0]:g}, {CLIP[1]:g}], {scale}")


def _require(module: str, what: str):
    """Import an optional dependency or raise an error with the install hint."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EmsegError(f"{what} needs the package '{module}', which is not installed ({exc}); "
                         f"install it with: {INSTALL_HINT}") from None


def _export_net(model, probabilities: bool) -> nn.Module:
    """A copy of the model's network on the CPU in float32 and eval mode, with a softmax when asked."""
    net = copy.deepcopy(model.net).to("cpu").float().eval()
    return (_Softmax(net) if probabilities else net).eval()


def _example(side: int = 64, batch: int = 1) -> torch.Tensor:
    """A normalised-looking example input ``(batch, 1, side, side)`` (fixed seed)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 1, side, side, generator=gen)


def export_torchscript(model, path: str | os.PathLike, *, probabilities: bool = True) -> Path:
    """Trace the network to a TorchScript file with dynamic batch, height and width.

    Args:
        model: an :class:`emseg.model.modelfile.Model`.
        path: output ``.pt`` file (written atomically); holds the card as ``emseg_card.json``.
        probabilities: softmax inside the graph (else the file outputs logits).

    Returns:
        The written path.
    """
    net = _export_net(model, probabilities)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace deprecation notices
        traced = torch.jit.trace(net, _example(64), check_trace=False)
        other = _example(96, batch=2)[..., :64]  # another height, width and batch
        if not torch.allclose(traced(other), net(other), atol=1e-5, rtol=1e-4):
            raise RuntimeError("the traced network does not generalise to other tile sizes")
    with atomic_output(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.save deprecation notice
        torch.jit.save(traced, str(tmp), _extra_files={CARD_FILE: model.card.to_json()})
    log.info("wrote TorchScript %s", path)
    return Path(path)


def _onnx_export(net: nn.Module, tmp: Path, opset: int) -> None:
    """torch.onnx.export with dynamic batch/height/width into one file (legacy exporter, then dynamo)."""
    axes = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        try:
            torch.onnx.export(net, (_example(64),), str(tmp), input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": axes, "output": axes}, opset_version=opset, dynamo=False)
            return
        except Exception as exc:  # noqa: BLE001 - removed or failing legacy exporter: try the new one
            log.info("legacy ONNX exporter failed (%s); using the torch.export-based one", exc)
        from torch.export import Dim
        h, w = Dim("h", min=1, max=1024), Dim("w", min=1, max=1024)
        torch.onnx.export(net, (_example(64),), str(tmp), input_names=["input"], output_names=["output"],
                          dynamic_shapes={"x": {0: Dim("batch", max=4096), 2: 32 * h, 3: 32 * w}},
                          opset_version=max(opset, 18), dynamo=True, external_data=False, verbose=False)


def export_onnx(model, path: str | os.PathLike, *, probabilities: bool = True, opset: int = ONNX_OPSET) -> Path:
    """Export the network to a single ONNX file with dynamic batch, height and width.

    Args:
        model: an :class:`emseg.model.modelfile.Model`.
        path: output ``.onnx`` file (written atomically); metadata ``emseg_card`` holds the card.
        probabilities: softmax inside the graph (else the file outputs logits).
        opset: ONNX opset version.

    Returns:
        The written path.
    """
    onnx = _require("onnx", "ONNX export")
    net = _export_net(model, probabilities)
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "model.onnx"
        _onnx_export(net, raw, opset)
        proto = onnx.load(str(raw))
    norm = model.card.normalization
    meta = {"emseg_card": model.card.to_json(), "classes": json.dumps(list(model.card.classes)),
            "output": "probabilities" if probabilities else "logits",
            "preprocessing": _preprocessing_text(norm)}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    with atomic_output(path) as tmp:
        onnx.save(proto, str(tmp))
    log.info("wrote ONNX %s (opset %d)", path, proto.opset_import[0].version)
    return Path(path)


def _sample_tile(model, sample: np.ndarray | None) -> np.ndarray:
    """A square test tile ``(S, S)`` float32: the centre of ``sample``, or a synthetic EM page."""
    side = min(int(model.card.tile_size), 256)
    if sample is None:
        from emseg.synthetic import make_em_stack
        sample = make_em_stack(1, side, side, seed=0, pixel_size_nm=model.card.pixel_size_nm or 6.0)[0][0]
    sample = np.asarray(sample)
    side = min(side, *(n // 32 * 32 for n in sample.shape))
    if sample.ndim != 2 or side < 32:
        raise ValueError(f"the sample image must be 2D and at least 32x32 pixels, got shape {sample.shape}")
    top, left = (sample.shape[0] - side) // 2, (sample.shape[1] - side) // 2
    return np.ascontiguousarray(sample[top:top + side, left:left + side], dtype=np.float32)


def _write_cover(path: Path, tile: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> None:
    """Cover PNG (2:1): the test tile beside its predicted labels overlaid, at least 256 px high."""
    from PIL import Image

    from emseg.io.write import write_overlay_png
    zoom = max(1, -(-256 // tile.shape[0]))
    big = np.kron(tile, np.ones((zoom, zoom), np.float32))
    big_labels = np.kron(labels, np.ones((zoom, zoom), labels.dtype))
    write_overlay_png(path, big, big_labels, class_names=class_names, max_size=max(big.shape))
    overlay = np.asarray(Image.open(path).convert("RGB"))
    lo, hi = np.percentile(big, [1, 99])
    grey = np.clip((big - lo) / (hi - lo if hi > lo else 1.0) * 255, 0, 255).astype(np.uint8)
    Image.fromarray(np.concatenate([np.repeat(grey[..., None], 3, -1), overlay], axis=1)).save(path)


def _training_summary(training: dict) -> str:
    """One line per entry of the card's ``training`` dict (lists and dicts shortened)."""
    lines = []
    for key, value in training.items():
        if isinstance(value, (list, tuple)):
            text = ", ".join(map(str, value[:5])) + (f", ... ({len(value)} in all)" if len(value) > 5 else "")
        elif isinstance(value, dict):
            text = ", ".join(f"{k}={v}" for k, v in list(value.items())[:8])
        else:
            text = str(value)
        lines.append(f"{key}: {text[:200]}")
    return "; ".join(lines) if lines else "not recorded in the model card"


def _documentation(model, pixel_note: str, training: str) -> str:
    """The README.md of a bioimage.io package."""
    card, norm = model.card, model.card.normalization
    classes = "\n".join(f"- channel {i}: {name}" for i, name in enumerate(card.classes))
    return (f"# {card.name}\n\n{card.description or 'A U-Net for electron microscopy segmentation.'}\n\n"
            f"Exported by emseg {card.emseg_version} (U-Net, encoder `{card.encoder}`).\n\n"
            f"## Input\n\nOne greyscale EM image, axes batch, channel (1), y, x; height and width multiples of 32 "
            f"(at least 32). {pixel_note}\n\nPreprocessing (in the package): {_preprocessing_text(norm)}. "
            f"For large images, run tiles of {card.tile_size} px with "
            f"{card.overlap} px overlap and normalise the whole image first, as emseg does.\n\n"
            f"## Output\n\nClass probabilities (softmax postprocessing of the network's logits), one channel per "
            f"class:\n\n{classes}\n\nThe label of a pixel is the channel with the highest probability.\n\n"
            f"## Training\n\n{training}\n\n## Validation\n\nemseg checks that the TorchScript and ONNX weights "
            f"reproduce its own tiled inference on a tile (to about 1e-6) and validates this package with "
            f"bioimageio.spec; the test tensors hold emseg's output on the test input.\n\n## Licence\n\nMIT\n")


def _bioimageio_descr(model, files: dict[str, Path], authors: Sequence[str]):
    """Build the bioimage.io 0.5 ModelDescr of an exported model from its staged files."""
    from bioimageio.spec.model import v0_5 as bio

    card, norm = model.card, model.card.normalization
    px = card.pixel_size_nm
    space = dict(scale=px, unit="nanometer") if px else {}
    pixel_note = (f"Pixel size {px:g} nm (axes y and x carry it)." if px else
                  "The model card records no pixel size, so the y and x axes have scale 1 and no unit.")
    training = _training_summary(card.training)
    inp, out = bio.TensorId("input"), bio.TensorId("output")
    preprocessing: list = [bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32"))]
    if norm.method == "percentile":
        preprocessing += [
            bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(axes=[bio.AxisId("y"), bio.AxisId("x")],
                                                            min_percentile=norm.low, max_percentile=norm.high)),
            bio.ClipDescr(kwargs=bio.ClipKwargs(min=CLIP[0], max=CLIP[1]))]
    preprocessing.append(bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(gain=1.0 / norm.std,
                                                                           offset=-norm.mean / norm.std)))
    input_axes = [bio.BatchAxis(), bio.ChannelAxis(channel_names=["em"])] + [
        bio.SpaceInputAxis(id=bio.AxisId(a), size=bio.ParameterizedSize(min=32, step=32), **space) for a in "yx"]
    output_axes = [bio.BatchAxis(), bio.ChannelAxis(channel_names=list(card.classes))] + [
        bio.SpaceOutputAxis(id=bio.AxisId(a), size=bio.SizeReference(tensor_id=inp, axis_id=bio.AxisId(a)), **space)
        for a in "yx"]
    description = (f"{card.description or 'U-Net segmentation of electron microscopy images'} "
                   f"(emseg, encoder {card.encoder}; classes: {', '.join(card.classes)}). {pixel_note} "
                   f"Training: {training}")
    softmax = bio.SoftmaxDescr(kwargs=bio.SoftmaxKwargs(axis=bio.AxisId("channel")))
    return bio.ModelDescr(
        name=card.name, description=description[:1000],
        authors=[bio.Author(name=a) for a in authors], license=bio.LicenseId("MIT"),
        cite=[bio.CiteEntry(text=UNET_CITATION[0], doi=bio.Doi(UNET_CITATION[1]))],
        documentation=bio.FileDescr(source=files["readme"]), covers=[bio.FileDescr(source=files["cover"])],
        tags=["electron-microscopy", "semantic-segmentation", "unet", "2d", "emseg", "pytorch", "onnx"],
        inputs=[bio.InputTensorDescr(id=inp, axes=input_axes, test_tensor=bio.FileDescr(source=files["test_input"]),
                                     preprocessing=preprocessing, description="raw greyscale EM image")],
        outputs=[bio.OutputTensorDescr(id=out, axes=output_axes, test_tensor=bio.FileDescr(source=files["test_output"]),
                                       postprocessing=[softmax],
                                       description="class probabilities")],
        weights=bio.WeightsDescr(
            torchscript=bio.TorchscriptWeightsDescr(source=files["torchscript"],
                                                    pytorch_version=bio.Version(torch.__version__.split("+")[0])),
            onnx=bio.OnnxWeightsDescr(source=files["onnx"], opset_version=ONNX_OPSET, parent="torchscript")),
        config={"emseg": {"card": json.loads(card.to_json()), "tile_size": card.tile_size, "overlap": card.overlap}},
    )


def export_bioimageio(model, path: str | os.PathLike, *, sample: np.ndarray | None = None,
                      authors: Sequence[str] = ()) -> Path:
    """Write a validated bioimage.io model package (zip, format 0.5) of the model.

    Args:
        model: an :class:`emseg.model.modelfile.Model`.
        path: output ``.zip`` (written atomically).
        sample: a 2D raw image whose centre becomes the test tensor and cover (default: synthetic EM).
        authors: author names (default: the card's ``training["author"]`` or "emseg user").

    Returns:
        The written path. Raises ModelFileError when bioimageio.spec finds the package invalid.
    """
    spec = _require("bioimageio.spec", "bioimage.io export")
    from emseg.infer.preprocess import normalize_page

    path = Path(path)
    if not authors and "author" not in model.card.training:
        log.warning("%s: no author given; the package names 'emseg user' (pass --author NAME)", path)
    authors = list(authors) or [str(model.card.training.get("author", "emseg user"))]
    tile = _sample_tile(model, sample)
    logits_net = _export_net(model, probabilities=False)
    with torch.no_grad():
        x = torch.from_numpy(normalize_page(tile, model.card.normalization))[None, None]
        probs = torch.softmax(logits_net(x), dim=1)
    with tempfile.TemporaryDirectory() as folder:
        d = Path(folder)
        files = {"test_input": d / "test_input.npy", "test_output": d / "test_output.npy", "cover": d / "cover.png",
                 "readme": d / "README.md", "torchscript": d / "weights_torchscript.pt", "onnx": d / "weights.onnx"}
        np.save(files["test_input"], tile[None, None])
        np.save(files["test_output"], probs.numpy().astype(np.float32))
        _write_cover(files["cover"], tile, probs[0].argmax(0).numpy(), model.card.classes)
        export_torchscript(model, files["torchscript"], probabilities=False)
        export_onnx(model, files["onnx"], probabilities=False)
        pixel_note = (f"Pixel size {model.card.pixel_size_nm:g} nm/px." if model.card.pixel_size_nm
                      else "Pixel size unknown (the model card records none).")
        files["readme"].write_text(_documentation(model, pixel_note, _training_summary(model.card.training)))
        try:
            descr = _bioimageio_descr(model, files, authors)
        except ValueError as exc:  # pydantic's ValidationError
            raise ModelFileError(f"{path}: cannot describe this model for bioimage.io: {exc}") from None
        with atomic_output(path) as tmp:
            spec.save_bioimageio_package(descr, output_path=tmp)
    loaded = spec.load_description(path, perform_io_checks=True)
    if isinstance(loaded, spec.InvalidDescr):
        raise ModelFileError(f"{path}: bioimageio.spec rejects the written package: "
                             f"{loaded.validation_summary.format()[:2000]}")
    log.info("wrote bioimage.io package %s (validated with bioimageio.spec %s)", path, spec.__version__)
    return path


def export_model(model_path: str | os.PathLike, fmt: str, output: str | os.PathLike, **options) -> Path:
    """Load a model file and export it in ``fmt`` (one of :data:`FORMATS`) to ``output``."""
    from emseg.model.modelfile import load_model
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model = load_model(model_path)
    if is_offset(model.card.label_offset):
        log.warning("%s: the model's predictions are moved by (%.2f, %.2f) px to follow its training annotation "
                    "(model card 'label_offset'); the exported network does not do this, so a consumer that "
                    "needs it must shift the probabilities itself", model_path, *model.card.label_offset)
    export = {"torchscript": export_torchscript, "onnx": export_onnx, "bioimageio": export_bioimageio}[fmt]
    return export(model, output, **options)


