"""Ortho-plane vs slice-by-slice (xy) inference on volumes: 3D objects, z splits and merges, time, memory.

    python benchmarks/bench_volume.py synthetic [--steps 500]    # synthetic FIB-SEM volumes, exact 3D labels
    python benchmarks/bench_volume.py epfl [--steps 500]         # EPFL mitochondria (../shared/data/epfl_mito)
    python benchmarks/bench_volume.py scale [--sizes 256 512]    # time and peak RSS of `emseg predict`

synthetic: a vgg11_bn_micro U-Net is trained on the xy slices of one synthetic volume
(emseg.synthetic3d, seed 0) and evaluated on another (seed 1), slice by slice (xy) and ortho-plane
(mean and vote; optionally also a model trained with --planes ortho). Mitochondria are the objects:
3D connected components of the predicted class (at least MIN_VOXELS voxels) against the exact 3D
labels: object counts, splits and merges, variation of information (split, merge), adapted Rand
error (emseg.analysis.measure3d.segmentation_scores_3d, scikit-image), and IoU per class.

epfl: the same on the EPFL stack (27 slices, 5 nm, mitochondria): trained on the xy of the first
17 slices, evaluated on the held-out ones. The stack's slices are NOT contiguous (slices.txt: gaps of
up to 26 sections), so ortho-plane inference is only run on the held-out runs of consecutive
slices (89-91 and 161-164), 3 and 4 slices deep, and compared with xy on those slices.

scale: `emseg predict` in a fresh process per run, on a uint8 cube of synthetic tissue (the
synthetic volume mirrored to the size), xy vs --planes ortho with a fixed --slab-memory; wall and
CPU time and peak RSS (getrusage of the child), one compute thread by default (--threads).

Results (JSON and a Markdown table) go to $EMSEG_BENCH_RUNS/volume (default runs/bench/volume).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EMSEG_DATA", REPO.parent / "shared" / "data"))
RUNS = Path(os.environ.get("EMSEG_BENCH_RUNS", REPO / "runs" / "bench")) / "volume"
CLASSES = ("background", "membrane", "mitochondrion")
MIN_VOXELS = 64
#: held-out runs of consecutive EPFL slices (indices into the 27-slice stack; names in slices.txt)
EPFL_TRAIN = range(0, 17)
EPFL_RUNS = {"89-91": range(17, 20), "161-164": range(23, 27)}


def machine() -> str:
    import torch
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()}, {os.cpu_count()} CPUs (load {load:.1f} at the start), torch {torch.__version__}, "
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}")


def train_micro(items, classes, steps: int, *, val_items=None, seed: int = 0):
    from emseg.train.loop import TrainConfig, train
    config = TrainConfig(encoder="vgg11_bn_micro", classes=classes, tile_size=128, batch_size=4, steps=steps,
                         val_every=max(50, steps // 5), device="cpu", pixel_size_nm=5.0, seed=seed,
                         label_offset=False)
    start = time.perf_counter()
    result = train(items, config, None, val_data=val_items)
    return result.model, time.perf_counter() - start


def predict(model, image, mode: str, voxel=(5.0, 5.0, 5.0)):
    """Labels of a volume: ``xy`` page by page, else ortho-plane with combine ``mode``; and seconds."""
    from emseg.infer.volume import predict_volume
    predictor = model.predictor(device="cpu", tile=256, overlap=64)
    start = time.perf_counter()
    directions = ("xy",) if mode == "xy" else ("xy", "xz", "yz")
    labels = predict_volume(predictor, image, voxel_size_nm=voxel, directions=directions,
                            combine="mean" if mode == "xy" else mode)
    return labels, time.perf_counter() - start


def scores(pred: np.ndarray, mask: np.ndarray, objects: np.ndarray, mito: int) -> dict:
    """3D object scores of class ``mito`` against the true instances ``objects``, IoU per class, z flicker."""
    from emseg.analysis.measure3d import segmentation_scores_3d
    from emseg.analysis.objects import find_instances
    found = find_instances(pred, three_d=True, class_ids=[mito], min_size_px=MIN_VOXELS).labels
    out = segmentation_scores_3d(found, objects)
    out.pop("iou")
    for c in range(1, int(mask.max()) + 1):
        a, b = pred == c, mask == c
        out[f"iou_class{c}"] = float(np.count_nonzero(a & b) / max(np.count_nonzero(a | b), 1))
    out["z_changes"] = float(np.mean(pred[1:] != pred[:-1]))
    out["z_changes_truth"] = float(np.mean(mask[1:] != mask[:-1]))
    return out


def table(rows: dict[str, dict], keys: list[str]) -> str:
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.3f}"
    return str(int(v)) if isinstance(v, float) else str(v)


KEYS = ["objects_true", "objects_pred", "count_error", "splits", "merges", "vi_split", "vi_merge",
        "adapted_rand_error", "iou_class1", "iou_class2", "z_changes", "seconds"]


def cmd_synthetic(args) -> dict:
    from emseg.synthetic3d import make_em_volume
    from emseg.train.loop import annotations_from_arrays
    shape_train, shape_test = tuple(args.train_shape), tuple(args.test_shape)
    train_vol, test_vol = make_em_volume(shape_train, seed=0), make_em_volume(shape_test, seed=1)
    items = annotations_from_arrays(train_vol.image, train_vol.mask, sparse=False, pixel_size_nm=5.0, name="train")
    model, train_s = train_micro(items, CLASSES, args.steps)
    models = {"xy-trained": (model, train_s)}
    if args.ortho_training:
        from emseg.model.card import Normalization
        from emseg.train.volume import volume_splits
        ortho_items, val = volume_splits(train_vol.image, train_vol.mask, 0.2, voxel_size_nm=(5, 5, 5), sparse=False,
                                         norm=Normalization(), name="train")
        models["ortho-trained"] = train_micro(ortho_items, CLASSES, args.steps, val_items=val)
    rows, preds = {}, {}
    for model_name, (m, _) in models.items():
        for mode in ("xy", "mean", "vote"):
            labels, seconds = predict(m, test_vol.image, mode)
            name = f"{model_name}, {'xy slices' if mode == 'xy' else 'ortho ' + mode}"
            rows[name] = {**scores(labels, test_vol.mask, test_vol.mitochondria, 2), "seconds": seconds}
            preds[name] = labels
            print(name, json.dumps(rows[name]), flush=True)
    if args.figure:
        figure(test_vol, preds, args.figure)
    return {"train_shape": shape_train, "test_shape": shape_test, "steps": args.steps,
            "train_seconds": {k: v[1] for k, v in models.items()}, "rows": rows}


def figure(vol, preds: dict, path: Path) -> None:
    """xz sections through the test volume: image, truth, xy-slice and ortho predictions (mitochondria)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    y = vol.image.shape[1] // 2
    names = [n for n in preds if n.startswith("xy-trained")]
    panels = [("image (xz section)", vol.image[:, y]), ("truth", vol.mask[:, y])] + \
             [(n.replace("xy-trained, ", "predicted: "), preds[n][:, y]) for n in names]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.25 * len(panels) * vol.image.shape[0] / 64 + 0.6),
                             constrained_layout=True)
    from emseg.io.write import PALETTE
    for ax, (title, data) in zip(axes, panels):
        if title.startswith("image"):
            ax.imshow(data, cmap="gray", interpolation="nearest")
        else:
            rgb = np.ones((*data.shape, 3)) * 0.12
            for c in (1, 2):
                rgb[data == c] = PALETTE[c - 1]
            ax.imshow(rgb, interpolation="nearest")
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel("z", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def cmd_epfl(args) -> dict:
    from emseg.train.loop import annotations_from_arrays
    folder = DATA / "epfl_mito"
    if not folder.exists():
        raise SystemExit(f"skipped: the EPFL data is not at {folder} (it lives beside the checkout in ../shared/data)")
    image = tifffile.imread(folder / "train-volume.tif")
    mask = (tifffile.imread(folder / "train-mito.tif") > 127).astype(np.uint8)
    items = annotations_from_arrays(image[list(EPFL_TRAIN)], mask[list(EPFL_TRAIN)], sparse=False, pixel_size_nm=5.0,
                                    name="epfl")
    model, train_s = train_micro(items, ("background", "mitochondrion"), args.steps)
    rows = {}
    from emseg.analysis.objects import find_instances
    for run, index in EPFL_RUNS.items():
        sub, truth = image[list(index)], mask[list(index)]
        objects = find_instances(truth, three_d=True).labels
        for mode in ("xy", "mean", "vote"):
            labels, seconds = predict(model, sub, mode)
            name = f"slices {run}, {'xy slices' if mode == 'xy' else 'ortho ' + mode}"
            rows[name] = {**scores(labels, truth, objects, 1), "seconds": seconds}
            print(name, json.dumps(rows[name]), flush=True)
    held = [i for i in range(17, 27)]
    labels, seconds = predict(model, image[held], "xy")
    rows["all 10 held-out slices, xy slices"] = {"iou_class1": float(np.count_nonzero((labels == 1) & (mask[held] == 1))
                                                                   / np.count_nonzero((labels == 1) | (mask[held] == 1))),
                                                 "seconds": seconds}
    return {"steps": args.steps, "train_seconds": train_s, "rows": rows}


def _child(argv: list[str], threads: int = 1) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS MiB) of `emseg` run in a fresh process with ``threads`` compute
    threads. CPU time (user + system) of one thread is the fairer measure on a shared machine: other
    processes stretch the wall time, and with several threads, OpenMP's spin-waiting for a descheduled
    thread inflates the CPU time too."""
    code = ("import resource, sys; from emseg.cli import main; rc = main(sys.argv[1:]); "
            "u = resource.getrusage(resource.RUSAGE_SELF); "
            "print('PEAK', u.ru_maxrss, u.ru_utime + u.ru_stime); sys.exit(rc)")
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    seconds = time.perf_counter() - start
    _, peak, cpu = next(line.split() for line in proc.stdout.splitlines() if line.startswith("PEAK"))
    return seconds, float(cpu), int(peak) / 1024


def cube(size: int, path: Path) -> None:
    """A uint8 cube of synthetic tissue (a 128³ synthetic volume mirrored to ``size``), with 5 nm voxels."""
    if path.exists():
        return
    from emseg.synthetic3d import make_em_volume
    base = make_em_volume((128, 128, 128), seed=2).image
    reps = -(-size // 128)
    tiles = np.concatenate([base if i % 2 == 0 else base[::-1] for i in range(reps)], 0)[:size]
    tiles = np.concatenate([tiles if i % 2 == 0 else tiles[:, ::-1] for i in range(reps)], 1)[:, :size]
    tiles = np.concatenate([tiles if i % 2 == 0 else tiles[:, :, ::-1] for i in range(reps)], 2)[:, :, :size]
    tifffile.imwrite(path, np.ascontiguousarray(tiles), imagej=True, resolution=(0.2, 0.2),
                     metadata={"unit": "nm", "spacing": 5.0, "axes": "ZYX"})


def cmd_scale(args) -> dict:
    from emseg.model.card import ModelCard
    from emseg.model.modelfile import Model
    work = RUNS / "scale"
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or Model.new(ModelCard(encoder="vgg11_bn_micro", classes=CLASSES, pixel_size_nm=5.0)).save(
        work / "micro.safetensors")
    rows = {}
    for size in args.sizes:
        path = work / f"cube{size}.tif"
        cube(size, path)
        for mode in args.modes:
            argv = ["-q", "predict", str(model), str(path), "-o", str(work / f"out{size}{mode}"), "--overwrite",
                    "--no-overlay", "--device", "cpu", "--tile", str(args.tile), "--overlap", str(args.overlap),
                    "--planes", mode, "--slab-memory", str(args.slab_memory)]
            seconds, cpu, peak = _child(argv, args.threads)
            rows[f"{size}³ {mode}"] = {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": peak,
                                       "megavoxels": size**3 / 1e6, "slab_memory_mb": args.slab_memory,
                                       "load": os.getloadavg()[0]}
            print(size, mode, rows[f"{size}³ {mode}"], flush=True)
        if set(args.modes) == {"xy", "ortho"}:
            xy, ortho = rows[f"{size}³ xy"], rows[f"{size}³ ortho"]
            ortho["ortho_over_xy_cpu"] = ortho["cpu_seconds"] / xy["cpu_seconds"]
            ortho["ortho_over_xy_time"] = ortho["seconds"] / xy["seconds"]
    return {"tile": args.tile, "overlap": args.overlap, "slab_memory_mb": args.slab_memory, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("synthetic")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--train-shape", type=int, nargs=3, default=(48, 192, 192))
    p.add_argument("--test-shape", type=int, nargs=3, default=(80, 160, 160))
    p.add_argument("--ortho-training", action="store_true", help="also train a model on all three planes")
    p.add_argument("--figure", type=Path, help="write the xz-section figure here (e.g. docs/img/volume_ortho.png)")
    p = sub.add_parser("epfl")
    p.add_argument("--steps", type=int, default=500)
    p = sub.add_parser("scale")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--slab-memory", type=float, default=1024)
    p.add_argument("--modes", nargs="+", default=["xy", "ortho"], choices=["xy", "ortho"])
    p.add_argument("--threads", type=int, default=1, help="compute threads of each run (OMP_NUM_THREADS; default 1)")
    p.add_argument("--name", default="scale", help="results file name (runs/bench/volume/NAME.json)")
    p.add_argument("--model", type=Path, help="model file (default: an untrained vgg11_bn_micro; speed is the same)")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    header = machine()
    result = {"synthetic": cmd_synthetic, "epfl": cmd_epfl, "scale": cmd_scale}[args.what](args)
    result["machine"] = header
    RUNS.mkdir(parents=True, exist_ok=True)
    out = RUNS / f"{getattr(args, 'name', args.what)}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    keys = KEYS if args.what != "scale" else ["megavoxels", "slab_memory_mb", "seconds", "cpu_seconds", "peak_rss_mib",
                                              "ortho_over_xy_cpu", "ortho_over_xy_time", "load"]
    print(f"\nmachine: {header}\n")
    print(table(result["rows"], keys))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
