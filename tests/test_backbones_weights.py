"""Weights files: identified from tensor names and shapes, read without running code.

Small random towers stand in for the real files (same tensor names, smaller widths), except
the CONCH-shaped dict, which only needs its names and a few shapes to be recognised.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")

from wsiproto.errors import WsiprotoError  # noqa: E402
from wsiproto.model import create_model, identify  # noqa: E402
from wsiproto.model.backbones.open_clip import hf_clip_to_open_clip  # noqa: E402
from wsiproto.model.weights import read_state_dict  # noqa: E402

TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4,
             "mlp_ratio": 2.0}


@pytest.fixture(scope="module")
def tiny_towers():
    """The open_clip state dict of dualproto-tiny's towers (random)."""
    model = create_model("dualproto-tiny", seed=3, descriptions_per_class=1)
    return {k: v.clone() for k, v in model.backbone.clip.state_dict().items()}


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text
    return text


def _conch_shaped() -> dict:
    return {"visual.trunk.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
            "visual.trunk.pos_embed": torch.zeros(1, 785, 768),
            "text.cls_emb": torch.zeros(768), "text.token_embedding.weight": torch.zeros(32007, 8),
            "text_decoder.resblocks.0.ln_1.weight": torch.zeros(8)}


# --- identification ------------------------------------------------------------------------------
def test_open_clip_state_dict_is_identified(tiny_towers, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "quilt.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_towers.items()}, str(path))
    found = identify(path)
    assert found.family == "open_clip" and found.facts["quick_gelu"] is None
    assert found.label == "open_clip ViT (patch 16, width 128, 4 blocks, 224 px)"
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    assert identify(path).facts["quick_gelu"] is True  # hf-hub folders say it beside the weights


def test_openai_state_dict_is_identified_and_switches_quick_gelu_on(tiny_towers, tmp_path):
    path = tmp_path / "openai.pt"
    torch.save({**tiny_towers, "input_resolution": 224, "context_length": 77, "vocab_size": 49408},
               path)
    found = identify(path)
    assert found.label.startswith("OpenAI CLIP ViT") and found.label.endswith("quick_gelu")
    model = create_model("dualproto-tiny", pretrained=path, descriptions_per_class=1)
    assert model.config.backbone.options["quick_gelu"] is True
    assert model.backbone.found == found.label
    torch.testing.assert_close(model.backbone.clip.visual.conv1.weight,
                               tiny_towers["visual.conv1.weight"], rtol=0, atol=0)


def test_conch_state_dict_is_identified_in_every_wrapping(tmp_path):
    state = _conch_shaped()
    variants = {"flat.bin": state, "wrapped.pth": {"state_dict": state, "epoch": 3},
                "ddp.pt": {f"module.{k}": v for k, v in state.items()}}
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        found = identify(tmp_path / name)
        assert found.family == "conch", name
        assert found.label.startswith("CONCH (CoCa ViT-B/16, 448-px position grid"), found.label
        assert "its 1 decoder tensor(s) ignored" in found.label
        assert not any(k.startswith(("module.", "text_decoder.")) for k in found.state)


def test_hf_clipmodel_maps_exactly_onto_open_clip(tmp_path):
    """PLIP's format: a transformers CLIPModel state dict becomes open_clip towers that compute
    the same image and text features (renames, q/k/v concatenation, transposes only)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                     "num_attention_heads": 4, "vocab_size": 49408, "max_position_embeddings": 77,
                     "hidden_act": "quick_gelu"},
        vision_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                       "num_attention_heads": 4, "image_size": 224, "patch_size": 16,
                       "hidden_act": "quick_gelu"},
        projection_dim=128)
    torch.manual_seed(0)
    hf = transformers.CLIPModel(config).eval()
    path = tmp_path / "pytorch_model.bin"
    torch.save(hf.state_dict(), path)
    found = identify(path)
    assert found.label.startswith("a Hugging Face CLIPModel state dict (PLIP format)")
    assert found.facts["quick_gelu"] is True
    model = create_model("dualproto-tiny", pretrained=path, descriptions_per_class=1)
    clip = model.backbone.clip
    x = torch.randn(2, 3, 224, 224)
    tokens = model.backbone.tokenize(["tumor necrosis", "a histopathology image of stroma"])
    with torch.no_grad():
        ours_img, ours_txt = clip.encode_image(x), clip.encode_text(tokens)
        hf_img = _features(hf.get_image_features(pixel_values=x))
        hf_txt = _features(hf.get_text_features(input_ids=tokens))
    torch.testing.assert_close(ours_img, hf_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_txt, hf_txt, rtol=1e-4, atol=1e-5)
    assert set(hf_clip_to_open_clip(hf.state_dict())) == set(clip.state_dict())


def _features(out):
    """transformers 4 returns the tensor, 5 an output object with ``pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# --- refusals and mismatches ---------------------------------------------------------------------
def test_other_models_are_refused_in_one_line(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(WsiprotoError) as err:
        create_model("dualproto-tiny", pretrained=path)
    _one_line(err, "resnet18.pth", "not the weights of a supported vision-language model",
              "'conv1.weight'", "CONCH")


class _Touch:
    """Unpickling this would create a file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_malicious_pickle_is_refused_never_executed(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"visual.conv1.weight": torch.zeros(1), "payload": _Touch(target)}, path)
    for attempt in (lambda: identify(path), lambda: create_model("dualproto-conch", pretrained=path)):
        with pytest.raises(WsiprotoError) as err:
            attempt()
        _one_line(err, "pytorch_model.bin", "not a plain tensor state dict", "open",
                  "refused without running it")
        assert not target.exists()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_and_non_dicts_are_refused(tmp_path):
    script = tmp_path / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(script))
    with pytest.raises(WsiprotoError) as err:
        identify(script)
    _one_line(err, "TorchScript archive")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(WsiprotoError) as err:
        read_state_dict(tensor)
    _one_line(err, "not a state dict", "Tensor")
    with pytest.raises(WsiprotoError) as err:
        identify(tmp_path / "absent.bin")
    _one_line(err, "no such weights file")


def test_preset_and_file_mismatch_names_both(tiny_towers, tmp_path):
    conch = tmp_path / "pytorch_model.bin"
    torch.save(_conch_shaped(), conch)
    with pytest.raises(WsiprotoError) as err:
        create_model("dualproto-tiny", pretrained=conch)
    _one_line(err, "these weights are CONCH", "preset dualproto-tiny builds open_clip",
              "choose preset dualproto-conch")
    tiny = tmp_path / "tiny.pt"
    torch.save(tiny_towers, tiny)
    for preset, builds in (("dualproto-conch", "CONCH conch_ViT-B-16 at 224 px"),
                           ("dualproto-vitb16", "open_clip ViT-B-16")):
        with pytest.raises(WsiprotoError) as err:
            create_model(preset, pretrained=tiny)
        _one_line(err, "tiny.pt", "these weights are open_clip ViT (patch 16, width 128",
                  f"preset {preset} builds {builds}", "choose preset dualproto-tiny")


def test_shape_check_names_the_first_difference_and_allows_unused_heads():
    from wsiproto.model.weights import TowerShapeMismatch, check_shapes

    want = {"trunk.w": torch.zeros(2, 3), "head.q": torch.zeros(4)}
    assert check_shapes({"trunk.w": torch.ones(2, 3)}, want, optional=("head.",)) == ["head.q"]
    with pytest.raises(TowerShapeMismatch, match=r"trunk.w is \[3, 2\], the towers need \[2, 3\]"):
        check_shapes({"trunk.w": torch.ones(3, 2), "head.q": torch.ones(4)}, want)
    with pytest.raises(TowerShapeMismatch, match="the file has no head.q"):
        check_shapes({"trunk.w": torch.ones(2, 3)}, want)
    with pytest.raises(TowerShapeMismatch, match="1 tensors the towers lack"):
        check_shapes({**want, "extra": torch.ones(1)}, want)
