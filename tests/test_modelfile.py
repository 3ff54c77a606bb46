import json

import pytest
import torch
from safetensors.torch import save_file

from emseg.errors import ModelFileError
from emseg.model.card import FORMAT_VERSION, ModelCard, Normalization
from emseg.model.modelfile import CARD_KEY, FOLDER_CARD, load_card, load_model, save_model


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["model.safetensors", "model_folder"])
def test_round_trip_rebuilds_from_the_card_alone(tmp_path, tiny_model, name):
    card = tiny_model.card.updated(pixel_size_nm=4.5, training={"images": 3}, label_offset=(-0.5, 0.25))
    path = tiny_model.save(tmp_path / name, card)
    loaded = load_model(path)
    assert loaded.card == card
    assert loaded.card.normalization == Normalization()
    assert _same_weights(loaded.net, tiny_model.net)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x), tiny_model.net.eval()(x))
    assert not list(tmp_path.rglob(".*partial*")), "temporary files left behind"


def test_single_file_holds_the_card_in_its_header(tmp_path, tiny_model):
    path = tiny_model.save(tmp_path / "m.safetensors")
    assert load_card(path).encoder == "vgg11_bn_micro"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_a_run_folder_stands_for_its_model(tmp_path, tiny_model):
    """`emseg train -o RUN` writes RUN/model.safetensors beside logs and pictures: RUN itself loads."""
    tiny_model.save(tmp_path / "run" / "model.safetensors")
    (tmp_path / "run" / "log.json").write_text("{}")
    assert _same_weights(load_model(tmp_path / "run").net, tiny_model.net)
    assert load_card(tmp_path / "run").encoder == "vgg11_bn_micro"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="neither a model folder .* nor a run folder"):
        load_model(tmp_path / "empty")


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nope.safetensors")


def test_not_a_model(tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("hello, I am not a model")
    with pytest.raises(ModelFileError, match=r"notes\.safetensors.*not an emseg model file"):
        load_model(bad)


def test_pickles_are_refused_without_being_opened(tmp_path):
    pickle_file = tmp_path / "model.pth"
    pickle_file.write_bytes(b"\x80\x04this would be unpickled by torch.load")
    with pytest.raises(ModelFileError, match="never unpickles"):
        load_model(pickle_file)


def test_weights_without_card(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ModelFileError, match="without an emseg model card"):
        load_model(path)


def test_card_that_does_not_match_the_weights(tmp_path, tiny_model):
    wrong = tiny_model.card.updated(classes=("a", "b"))  # 2 classes, weights have 3
    path = save_model(tiny_model.net, wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(ModelFileError, match=r"wrong\.safetensors: the weights do not match the card"):
        load_model(path)


def test_card_from_a_newer_emseg(tmp_path, tiny_model):
    folder = tiny_model.save(tmp_path / "m")
    data = json.loads((folder / FOLDER_CARD).read_text())
    data["format_version"] = FORMAT_VERSION + 1
    data["emseg_version"] = "9.0"
    (folder / FOLDER_CARD).write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match=r"newer emseg \(9\.0.*Upgrade"):
        load_model(folder)


def test_malformed_card(tmp_path, tiny_model):
    path = tmp_path / "m.safetensors"
    state = {k: v.contiguous() for k, v in tiny_model.net.state_dict().items()}
    save_file(state, str(path), metadata={CARD_KEY: json.dumps({"format_version": 1, "encoder": "vgg11_bn_micro"})})
    with pytest.raises(ModelFileError, match="malformed"):
        load_model(path)


def test_card_rejects_bad_normalisation():
    with pytest.raises(ValueError):
        ModelCard(encoder="vgg11", classes=("a", "b"), normalization=Normalization(low=90, high=10))


def test_decoder_layout_travels_with_the_card(tmp_path):
    from emseg.model.modelfile import Model
    torch.manual_seed(0)
    card = ModelCard(encoder="vgg11_bn_micro", classes=("background", "membrane"), tile_size=64, overlap=16)
    model = Model.new(card)
    loaded = load_model(model.save(tmp_path / "m.safetensors"))
    # the defaults for new models: the full-resolution skip and nearest upsampling (smp's)
    assert loaded.card.full_resolution_skip and loaded.card.decoder_upsampling == "nearest"
    assert {b.interpolation_mode for b in loaded.net.decoder.blocks} == {"nearest"}
    assert _same_weights(loaded.net, model.net)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x), model.net.eval()(x))
    # format-1 cards, written before either option existed, describe smp's decoder: no skip, nearest
    old = json.loads(card.to_json())
    del old["full_resolution_skip"], old["decoder_upsampling"]
    old["format_version"] = 1
    old_card = ModelCard.from_dict(old)
    assert old_card.full_resolution_skip is False and old_card.decoder_upsampling == "nearest"
    old_net = Model.new(old_card).net
    assert old_net.decoder.blocks[-1].conv1[0].in_channels == 8  # upsampled features alone
    assert {b.interpolation_mode for b in old_net.decoder.blocks} == {"nearest"}
    # format-2 cards have the skip but were all written with nearest upsampling
    format_2 = {**old, "full_resolution_skip": True, "format_version": 2}
    assert ModelCard.from_dict(format_2).decoder_upsampling == "nearest"
    # a copy written again (fine-tuning one) is a card of this format that keeps the old layout
    assert old_card.updated(name="tuned").format_version == FORMAT_VERSION
    again = ModelCard.from_dict(json.loads(old_card.updated().to_json()))
    assert again.full_resolution_skip is False and again.decoder_upsampling == "nearest"
    # an upsampling this emseg does not know is refused with the file named
    folder = model.save(tmp_path / "odd")
    data = json.loads((folder / FOLDER_CARD).read_text())
    data["decoder_upsampling"] = "cubic"
    (folder / FOLDER_CARD).write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match=r"odd: model card is malformed: unknown decoder_upsampling 'cubic'"):
        load_model(folder)


def test_default_loads_the_bundled_model_in_python_as_in_the_cli(tmp_path, monkeypatch):
    """`emseg.load_model("default")` is the bundled model (the README's Python example), unless a file
    of that name exists in the working folder."""
    import emseg
    from emseg.model.modelfile import default_model_path
    if not default_model_path().exists():
        pytest.skip("the bundled default model is not built yet (data_samples/train_default.py)")
    model = emseg.load_model("default")
    assert model.path == default_model_path()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(emseg.model.modelfile.ModelFileError, match="not found"):
        emseg.load_model("other")
