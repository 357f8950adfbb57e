"""Model families in checkpoints: a non-NEPA family round-trips through save_model / load_model, a checkpoint of
another family than the caller expects fails with one line, a version-1 arvision.json (no family) reads as
nepa_vit, and `arvision models` lists presets by family with parameter counts."""
import json
from dataclasses import asdict, dataclass, fields

import pytest
import torch

from arvision import NepaViT
from arvision.checkpoints import (
    convert, export_official, load_model, load_weights, matching_preset, official_config_to_arvision, save_model,
)
from arvision.models.registry import create_model, register_family, register_model
from test_checkpoints import reference, save_official, tiny_config


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))



@dataclass
class TinyAutoencoderConfig:
    """A test-only family: two linear maps; ``scale`` changes the output but no weight shape."""
    dim: int = 6
    hidden: int = 4
    scale: float = 1.0

    @classmethod
    def from_dict(cls, d: dict) -> "TinyAutoencoderConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class TinyAutoencoder(torch.nn.Module):
    def __init__(self, config: TinyAutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = torch.nn.Linear(config.dim, config.hidden)
        self.decoder = torch.nn.Linear(config.hidden, config.dim)

    def forward(self, x):
        return self.decoder(torch.tanh(self.encoder(x))) * self.config.scale


FAMILY = "test_tiny_autoencoder"
register_family(FAMILY, TinyAutoencoder, TinyAutoencoderConfig, "test-only autoencoder")


@register_model(family=FAMILY)
def tiny_autoencoder_d6():
    return dict(dim=6, hidden=4)


@register_model(family=FAMILY)
def tiny_autoencoder_d8():  # equal to a NEPA preset in no way; only its own family is searched
    return dict(dim=8, hidden=4)


def test_other_family_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny_autoencoder_d6")
    x = torch.randn(3, 6)
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}
    assert matching_preset(model.config) == "tiny_autoencoder_d6"
    d = save_model(model, tmp_path / "ae", ema_state_dict=ema, preset="tiny_autoencoder_d6")
    meta = json.loads((d / "arvision.json").read_text())
    assert (meta["format_version"], meta["family"], meta["model"]) == (2, FAMILY, dict(dim=6, hidden=4, scale=1.0))
    for loaded in (load_model(d), load_model(d, family=FAMILY)):
        assert type(loaded) is TinyAutoencoder and loaded.config == model.config and not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
    ema_model = load_model(d, ema=True)
    assert all(torch.equal(ema_model.state_dict()[k], ema[k]) for k in ema)
    scaled = load_model(d, scale=2.0)  # a field that keeps the weight shapes
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), 2 * model(x))
    with pytest.raises(ValueError) as err:  # a field that changes them
        load_model(d, hidden=5)
    msg = str(err.value)
    assert "\n" not in msg and "overrides (hidden=5)" in msg and "encoder.weight (4, 6) in checkpoint vs (5, 6)" in msg
    target = TinyAutoencoder(TinyAutoencoderConfig())
    load_weights(target, d)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="skip_head applies to .* TinyAutoencoder has none"):
        load_weights(target, d, skip_head=True)
    out = convert(d, tmp_path / "converted")
    meta = json.loads((out / "arvision.json").read_text())
    assert (meta["family"], meta["preset"]) == (FAMILY, "tiny_autoencoder_d6")
    with pytest.raises(ValueError, match="export_official writes NEPA ViTs only; this is a test_tiny_autoencoder"):
        export_official(model, tmp_path / "official")


def test_wrong_family_gives_one_line_error(tmp_path):
    ae = save_model(create_model("tiny_autoencoder_d6"), tmp_path / "ae")
    with pytest.raises(ValueError) as err:
        load_model(ae, family="nepa_vit")
    assert str(err.value) == (f"{ae} is a {FAMILY} checkpoint, not nepa_vit; load it with "
                              f"arvision.load_model(path, family='{FAMILY}')")
    nepa = NepaViT(official_config_to_arvision(tiny_config()))
    with pytest.raises(ValueError, match=f"is a {FAMILY} checkpoint, not nepa_vit"):
        load_weights(nepa, ae)
    official = save_official(reference(tiny_config()), tmp_path / "official")
    with pytest.raises(ValueError, match=f"is a nepa_vit checkpoint, not {FAMILY}"):
        load_model(official, family=FAMILY)
    with pytest.raises(ValueError, match=f"is a nepa_vit checkpoint, not {FAMILY}"):
        load_weights(TinyAutoencoder(TinyAutoencoderConfig()), official)
    with pytest.raises(ValueError, match="unknown model family 'nepa'"):
        load_model(ae, family="nepa")
    assert isinstance(load_model(official, family="nepa_vit"), NepaViT)
    with pytest.raises(ValueError, match="not a registered arvision model family"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "plain")


def test_version_1_description_reads_as_nepa(tmp_path, images):
    torch.manual_seed(0)
    model = NepaViT(official_config_to_arvision(tiny_config("affine_swiglu"))).eval()
    d = save_model(model, tmp_path / "v1")
    meta_file = d / "arvision.json"
    # exactly what arvision wrote before families existed
    meta_file.write_text(json.dumps({"format": "arvision", "format_version": 1, "model": model.config.to_dict(),
                                     "preset": None}, indent=2))
    loaded = load_model(d, family="nepa_vit")
    assert type(loaded) is NepaViT and loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(images), model.forward_features(images))
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(meta, format_version=2)))  # version 2 must name its family
    with pytest.raises(ValueError, match="names no model family"):
        load_model(d)
    meta_file.write_text(json.dumps(dict(meta, format_version=2, family="no_such_family")))
    with pytest.raises(ValueError, match="'no_such_family' model, a family this arvision does not know"):
        load_model(d)
    meta_file.write_text(json.dumps(dict(meta, format_version=3, family="nepa_vit")))
    with pytest.raises(ValueError, match="format_version 3, newer"):
        load_model(d)


def test_models_command_lists_families(capsys):
    from arvision.cli import main

    main(["models", "--family", FAMILY])
    lines = capsys.readouterr().out.splitlines()
    n6 = sum(p.numel() for p in create_model("tiny_autoencoder_d6").parameters())
    assert lines[0] == f"{FAMILY}: test-only autoencoder"
    assert lines[1].split() == ["tiny_autoencoder_d6", f"{n6:,}", "params", "dim=6", "hidden=4"]
    assert lines[2].split()[:2] == ["tiny_autoencoder_d8", str(8 * 4 + 4 + 4 * 8 + 8)]  # encoder + decoder
    main(["models"])
    out = capsys.readouterr().out
    assert "nepa_vit: " in out and f"\n{FAMILY}: " in out
    line = next(x for x in out.splitlines() if x.split()[:1] == ["nepa_base_patch14_224"])
    assert line.split()[1] == "85,527,552"  # the official base count, counted on the meta device
