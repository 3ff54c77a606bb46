"""`emseg predict --planes ortho`: files in, 3D masks out (emseg.infer.volume_run), here and on a dask cluster."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile

from emseg.cli import main
from emseg.infer.volume import predict_volume

CLASSES = ["background", "membrane", "mitochondrion"]


@pytest.fixture
def model_path(tiny_model, tmp_path):
    return tiny_model.save(tmp_path / "tiny.safetensors", card=tiny_model.card.updated(pixel_size_nm=5.0))


def _imagej_stack(path, data, pixel_nm=5.0, spacing_nm=5.0):
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / pixel_nm, 1 / pixel_nm),
                     metadata={"unit": "nm", "spacing": spacing_nm, "axes": "ZYX"})


def _volume(shape=(10, 48, 40), seed=0):
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def test_ortho_writes_the_python_result_with_the_voxel_size(model_path, tiny_model, tmp_path):
    data = _volume()
    _imagej_stack(tmp_path / "vol.tif", data, spacing_nm=6.0)
    out = tmp_path / "out"
    assert main(["-q", "predict", str(model_path), str(tmp_path / "vol.tif"), "-o", str(out), "--planes", "ortho",
                 "--probabilities", "--device", "cpu"]) == 0
    predictor = tiny_model.predictor(device="cpu")
    labels, probs = predict_volume(predictor, data, voxel_size_nm=(6.0, 5.0, 5.0), return_probabilities=True)
    np.testing.assert_array_equal(tifffile.imread(out / "vol_mask.tif"), labels)
    np.testing.assert_allclose(tifffile.imread(out / "vol_probs.tif"), probs, atol=1e-5)
    with tifffile.TiffFile(out / "vol_mask.tif") as tif:
        meta = tif.shaped_metadata[0]
    assert meta["voxel_size_nm"] == [6.0, 5.0, 5.0] and meta["planes"] == "ortho" and meta["classes"] == CLASSES
    from PIL import Image
    with Image.open(out / "vol_overlay.png") as im:  # xy + yz side by side, xz below: wider and taller than a page
        assert im.size[0] > 40 and im.size[1] > 48
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_ortho_vote_zarr_and_voxel_flag(model_path, tmp_path):
    data = _volume(seed=1)
    tifffile.imwrite(tmp_path / "plain.tif", data, photometric="minisblack")  # no calibration at all
    out = tmp_path / "out"
    assert main(["-q", "predict", str(model_path), str(tmp_path / "plain.tif"), "-o", str(out), "--planes", "ortho",
                 "--combine", "vote", "--voxel-size", "5,5,5", "--format", "zarr", "--no-overlay"]) == 0
    from emseg.io.read import open_image
    with open_image(out / "plain_mask.zarr") as src:
        assert src.voxel_size_nm == (5.0, 5.0, 5.0) and src.shape == data.shape
    assert not (out / "plain_overlay.png").exists()


def test_each_bad_input_gets_one_line_and_the_others_still_run(model_path, tmp_path, capsys):
    _imagej_stack(tmp_path / "good.tif", _volume(seed=2))
    tifffile.imwrite(tmp_path / "flat.tif", _volume((48, 40)), resolution=(2e6, 2e6), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "one.tif", _volume((1, 48, 40)), photometric="minisblack")  # a (1, h, w) stack
    tifffile.imwrite(tmp_path / "nospacing.tif", _volume(seed=3), photometric="minisblack",
                     resolution=(2e6, 2e6), resolutionunit="CENTIMETER")
    _imagej_stack(tmp_path / "sstem.tif", _volume(seed=4), pixel_nm=4.0, spacing_nm=50.0)
    names = ["flat.tif", "one.tif", "nospacing.tif", "sstem.tif", "good.tif"]
    code = main(["predict", str(model_path), *[str(tmp_path / n) for n in names], "-o", str(tmp_path / "out"),
                 "--planes", "ortho", "--device", "cpu"])
    assert code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    expected = {"flat.tif": "is a 2D image", "one.tif": "stack of one slice", "nospacing.tif": "--voxel-size Z,Y,X",
                "sstem.tif": "12.5x anisotropic"}
    for name, words in expected.items():
        [line] = [e for e in errors if f"{name}:" in e]
        assert words in line
    assert "4 inputs failed" in errors[-1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good_mask.tif", "good_overlay.png"]


def test_disagreeing_pixel_and_voxel_sizes_are_refused(model_path, tmp_path, capsys):
    _imagej_stack(tmp_path / "v.tif", _volume())
    assert main(["predict", str(model_path), str(tmp_path / "v.tif"), "-o", str(tmp_path / "o"), "--planes", "ortho",
                 "--pixel-size", "4", "--voxel-size", "5,5,5"]) == 1
    assert "disagree" in capsys.readouterr().err


def test_ortho_instances_are_measured_in_3d(model_path, tmp_path):
    _imagej_stack(tmp_path / "vol.tif", _volume(seed=5))
    out = tmp_path / "out"
    assert main(["-q", "predict", str(model_path), str(tmp_path / "vol.tif"), "-o", str(out), "--planes", "ortho",
                 "--instances", "--measure", "--device", "cpu"]) == 0
    with open(out / "vol_objects.csv") as f:
        header = next(csv.reader(f))
    assert "volume_nm3" in header and "surface_area_nm2" in header and "n_slices" in header
    with tifffile.TiffFile(out / "vol_instances.tif") as tif:
        assert tif.shaped_metadata[0]["three_d"] is True


def test_xy_mode_carries_the_voxel_size_into_the_mask(model_path, tmp_path):
    _imagej_stack(tmp_path / "vol.tif", _volume((3, 48, 40)), spacing_nm=7.0)
    assert main(["-q", "predict", str(model_path), str(tmp_path / "vol.tif"), "-o", str(tmp_path / "out")]) == 0
    with tifffile.TiffFile(tmp_path / "out" / "vol_mask.tif") as tif:
        assert tif.shaped_metadata[0]["voxel_size_nm"] == [7.0, 5.0, 5.0]


def test_cluster_run_equals_the_local_run(model_path, tiny_model, tmp_path):
    distributed = pytest.importorskip("distributed", reason="needs dask.distributed (the distributed extra)")
    from emseg.infer.volume_run import predict_volume_file, predict_volume_files_distributed
    data = _volume((14, 48, 40), seed=6)
    _imagej_stack(tmp_path / "vol.tif", data)
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    options = dict(tile=64, overlap=16, batch_size=4, tta=False, device="cpu")
    common = dict(memory_mb=0.05, probabilities=True)  # several slabs
    local = predict_volume_file(tiny_model.predictor(**options), tmp_path / "vol.tif", tmp_path / "local", **common)
    seen = []
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        outcomes = list(predict_volume_files_distributed(
            client, tiny_model, [tmp_path / "bad.tif", tmp_path / "vol.tif"], tmp_path / "dist", options=options,
            progress_for=lambda path: lambda done, total, text: seen.append((done, total)), **common))
        assert not client.run(lambda dask_worker: [p for p in dask_worker.plugins if p.startswith("emseg")]).get(
            "x")
    assert type(outcomes[0][1]).__name__ == "InputError"
    assert outcomes[1][1].status == "written" and local.status == "written"
    for name in ("vol_mask.tif", "vol_probs.tif"):
        np.testing.assert_allclose(tifffile.imread(tmp_path / "dist" / name), tifffile.imread(tmp_path / "local" / name),
                                   atol=1e-5)
    assert len(seen) > 2 and seen[-1][0] == pytest.approx(seen[-1][1])
    assert (tmp_path / "dist" / "vol_overlay.png").exists()


def test_cli_scheduler_runs_ortho_slabs_on_the_cluster(model_path, tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed", reason="needs dask.distributed (the distributed extra)")
    from emseg.cli import predict as cli_predict
    _imagej_stack(tmp_path / "vol.tif", _volume((8, 48, 40), seed=7))
    monkeypatch.setattr(cli_predict, "connect", lambda scheduler, workers: distributed.Client(
        distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0")))
    common = ["-q", "predict", str(model_path), str(tmp_path / "vol.tif"), "--planes", "ortho", "--device", "cpu",
              "--no-overlay"]
    assert main([*common, "-o", str(tmp_path / "dist"), "--scheduler", "local"]) == 0
    assert main([*common, "-o", str(tmp_path / "local")]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "dist" / "vol_mask.tif"),
                                  tifffile.imread(tmp_path / "local" / "vol_mask.tif"))
