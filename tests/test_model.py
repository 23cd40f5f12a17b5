"""DualProtoSeg model: shapes, gradients, switches, masks, checkpoints, class tables."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")

from wsiproto.classes import BCSS, ClassTable, get_class_table, list_class_tables  # noqa: E402
from wsiproto.errors import WsiprotoError  # noqa: E402
from wsiproto.model import (  # noqa: E402
    create_model,
    evenly_spaced_blocks,
    list_presets,
    load_model,
    mask_scores,
    predict_masks,
    save_model,
)

SIZES = [28, 56, 112, 224]
CHANNELS = [256, 128, 64, 32]


@pytest.fixture(scope="module")
def tiny():
    return create_model("dualproto-tiny", seed=0)


def _images(n=2, seed=0):
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


# --- class tables --------------------------------------------------------------------------------
def test_class_tables_round_trip_and_registry():
    assert set(list_class_tables()) == {"bcss", "luad-histoseg", "wsss4luad"}
    assert BCSS.names == ["TUM", "STR", "LYM", "NEC"] and BCSS.background_index == 4
    assert BCSS.palette()[3] == (153, 0, 255) and BCSS.background_colour == (255, 255, 255)
    assert all(len(c.descriptions) == 10 for c in BCSS)
    for name in list_class_tables():
        table = get_class_table(name)
        assert ClassTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    assert get_class_table("BCSS-WSSS") is BCSS
    assert get_class_table(["a", "b"]).descriptions() == [["a"], ["b"]]
    with pytest.raises(WsiprotoError, match="unknown class table"):
        get_class_table("nope")
    with pytest.raises(WsiprotoError, match="11 requested"):
        BCSS.descriptions(11)


def test_evenly_spaced_blocks():
    assert evenly_spaced_blocks(12) == [2, 5, 8, 11]
    assert evenly_spaced_blocks(4) == [0, 1, 2, 3]
    assert evenly_spaced_blocks(6) == [1, 2, 4, 5]
    with pytest.raises(WsiprotoError):
        evenly_spaced_blocks(3)


# --- shapes --------------------------------------------------------------------------------------
def _check_shapes(model, batch):
    out = model(_images(batch))
    assert len(out.logits) == len(out.cams) == 4
    for logits, cams, size in zip(out.logits, out.cams, SIZES):
        assert logits.shape == (batch, 4)
        assert cams.shape == (batch, 4, size, size)
    # A class logit is the global average of its class CAM (same merge weights).
    torch.testing.assert_close(out.cams[-1].mean((2, 3)), out.logits[-1], rtol=1e-4, atol=1e-4)


def test_tiny_shapes_every_level(tiny):
    assert {"dualproto-tiny", "dualproto-vitb16"} <= set(list_presets())
    assert [lvl.head[0].out_channels for lvl in tiny.levels] == CHANNELS
    tiny.eval()
    with torch.inference_mode():
        _check_shapes(tiny, 2)


def test_vitb16_shapes_random_init():
    model = create_model("dualproto-vitb16", seed=0, descriptions_per_class=2).eval()
    assert model.backbone.blocks == [2, 5, 8, 11]
    assert model.backbone.vision_width == 768 and model.backbone.embed_dim == 512
    counts = model.parameter_counts()
    assert counts["frozen"] > 140e6 and 5e6 < counts["trainable"] < 20e6
    with torch.inference_mode():
        _check_shapes(model, 1)


def test_input_is_checked(tiny):
    with pytest.raises(WsiprotoError, match=r"\[B, 3, 224, 224\]"):
        tiny(torch.randn(1, 3, 256, 256))


# --- gradients -----------------------------------------------------------------------------------
def test_gradients_reach_trainable_parts_only(tiny):
    tiny.train()
    assert not tiny.backbone.clip.training  # frozen towers stay in eval mode
    tiny.zero_grad(set_to_none=True)
    out = tiny(_images(2), cams=False)
    loss, parts = tiny.loss(out, torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]]))
    assert set(parts) == {"bce_0", "bce_1", "bce_2", "bce_3"}
    loss.backward()
    for name, p in tiny.named_parameters():
        if name.startswith("backbone."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    named = dict(tiny.named_parameters())
    for key in ("prompts.ctx", "image_prototypes", "refiner.inp.weight", "levels.0.head.0.weight",
                "levels.3.proto_proj.weight", "levels.3.logit_scale"):
        assert named[key].grad.abs().sum() > 0, key
    tiny.zero_grad(set_to_none=True)
    tiny.eval()


def test_unfreeze_trains_the_towers():
    model = create_model("dualproto-tiny", seed=0, unfreeze=True, descriptions_per_class=1)
    model.train()
    assert model.backbone.clip.training
    out = model(_images(1), cams=False)
    model.loss(out, torch.ones(1, 4))[0].backward()
    assert model.backbone.clip.visual.conv1.weight.grad is not None
    assert model.backbone.clip.token_embedding.weight.grad is not None


def test_text_prototypes_cached_only_at_inference(tiny):
    tiny.eval()
    with torch.inference_mode():
        first = tiny.bank()
        assert tiny.bank() is not None and tiny.prompts._cache is not None
        cached = tiny.prompts._cache[1]
    assert tiny.prompts() is not cached  # grad enabled: recomputed
    tiny.train()
    assert tiny.prompts._cache is None
    tiny.eval()
    with torch.no_grad():
        tiny.prompts.ctx.add_(0.5)  # in-place edit invalidates through the version counter
        changed = tiny.bank()
        tiny.prompts.ctx.sub_(0.5)
    assert not torch.allclose(first, changed)


# --- switches ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, per_class, text, image", [
    ({}, 20, 10, 10),
    ({"prototypes": "text"}, 10, 10, 0),
    ({"prototypes": "image"}, 10, 0, 10),
    ({"descriptions_per_class": 3}, 6, 3, 3),
    ({"descriptions_per_class": 3, "image_prototypes_per_class": 5}, 8, 3, 5),
])
def test_bank_switches(options, per_class, text, image):
    model = create_model("dualproto-tiny", seed=0, **options).eval()
    assert model.num_prototypes == 4 * per_class
    kinds = model.prototype_kind.view(4, per_class)
    assert (kinds == 0).sum(1).tolist() == [text] * 4 and (kinds == 1).sum(1).tolist() == [image] * 4
    assert model.prototype_class.tolist() == sum(([c] * per_class for c in range(4)), [])
    assert (model.prompts is None) == (text == 0)
    assert (model.image_prototypes is None) == (image == 0)
    with torch.inference_mode():
        assert model.bank().shape == (4 * per_class, model.config.proto_dim)


def test_n_ctx_and_pyramid_switches():
    model = create_model("dualproto-tiny", seed=0, n_ctx=4, pyramid=False, descriptions_per_class=1)
    assert model.prompts.ctx.shape == (4, 4, model.backbone.text_width)
    assert model.num_levels == 1
    model.eval()
    with torch.inference_mode():
        out = model(_images(1))
    assert len(out.logits) == 1 and out.cams[0].shape == (1, 4, 224, 224)
    assert model.loss(out, torch.ones(1, 4))[0].ndim == 0


def test_optional_loss_terms():
    model = create_model("dualproto-tiny", seed=0, descriptions_per_class=2, align_weight=0.5,
                         diversity_weight=0.1)
    out = model(_images(1), cams=False)
    total, parts = model.loss(out, torch.ones(1, 4))
    assert {"align", "diversity"} <= set(parts)
    total.backward()


def test_classes_from_other_tables():
    model = create_model("dualproto-tiny", classes="wsss4luad", seed=0, descriptions_per_class=1)
    assert model.num_classes == 3
    with torch.inference_mode():
        assert model.eval()(_images(1)).logits[0].shape == (1, 3)


# --- masks ---------------------------------------------------------------------------------------
def test_predict_masks_protocols(tiny):
    images = _images(2)
    labels = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0]])
    masks = predict_masks(tiny, images, labels)
    assert masks.dtype == torch.int64 and masks.shape == (2, 224, 224)
    assert set(masks[0].unique().tolist()) <= {0, 4}  # only the labelled class or background
    assert set(masks[1].unique().tolist()) <= {1, 2, 4}
    scores, probs = mask_scores(tiny, images)
    assert scores.shape == (2, 5, 224, 224) and probs.shape == (2, 4)
    assert float(scores.min()) >= 0 and float(scores.max()) <= 1
    predicted = predict_masks(tiny, images)
    assert int(predicted.max()) <= 4
    # thresholds of 1.01 gate every class off; keep_top keeps the most probable one per image
    top = predict_masks(tiny, images, thresholds=[1.01] * 4)
    for b in range(2):
        assert set(top[b].unique().tolist()) <= {int(probs[b].argmax()), 4}
    assert tiny.training is False


def test_tta_and_crf(tiny):
    images = _images(1)
    masks = predict_masks(tiny, images, torch.tensor([[1, 1, 0, 0]]), tta=True)
    assert masks.shape == (1, 224, 224)
    pytest.importorskip("pydensecrf.densecrf")
    refined = predict_masks(tiny, images, torch.tensor([[1, 1, 0, 0]]), crf=True)
    assert refined.shape == (1, 224, 224) and set(refined.unique().tolist()) <= {0, 1, 4}


# --- checkpoints ---------------------------------------------------------------------------------
def test_save_load_identical(tiny, tmp_path):
    save_model(tiny, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["classes"]["classes"][0]["name"] == "TUM" and config["data"]["mpp"] == 0.5
    assert config["data"]["tile_size"] == 224 and config["masks"]["thresholds"] == [0.5] * 4
    loaded = load_model(tmp_path / "m")
    images = _images(2, seed=3)
    tiny.eval()
    with torch.inference_mode():
        a, b = tiny(images), loaded(images)
    for x, y in zip(a.logits + a.cams, b.logits + b.cams):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert torch.equal(predict_masks(tiny, images), predict_masks(loaded, images))


def test_saved_token_table_is_compact_and_half_storage(tiny, tmp_path):
    """Only the prompt tokens' embedding rows are stored (outputs stay bit-identical, see
    test_save_load_identical); ``half`` halves the file again and stays close."""
    from safetensors.torch import load_file

    save_model(tiny, tmp_path / "full")
    stored = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert "backbone.clip.token_embedding.weight" not in stored
    rows = stored["backbone.clip.token_embedding.weight.rows_used"]
    assert 0 < rows.numel() < 1000  # of a 49408-token vocabulary
    assert set(rows.tolist()) == set(torch.unique(tiny.prompts.tokens).tolist())
    save_model(tiny, tmp_path / "half", half=True)
    size = (tmp_path / "half" / "model.safetensors").stat().st_size
    assert size < 0.55 * (tmp_path / "full" / "model.safetensors").stat().st_size
    assert json.loads((tmp_path / "half" / "config.json").read_text())["weights"]["stored_dtype"] == "float16"
    loaded = load_model(tmp_path / "half")
    images = _images(2, seed=4)
    tiny.eval()
    with torch.inference_mode():
        a, b = tiny(images), loaded(images)
    assert next(loaded.parameters()).dtype == torch.float32
    torch.testing.assert_close(a.logits[-1], b.logits[-1], rtol=0.02, atol=0.02)


def test_save_without_backbone(tmp_path):
    model = create_model("dualproto-tiny", seed=1, descriptions_per_class=1)
    towers = tmp_path / "towers.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.backbone.clip.state_dict().items()}, towers)
    save_model(model, tmp_path / "m", include_backbone=False)
    with pytest.raises(WsiprotoError, match="without its backbone"):
        load_model(tmp_path / "m")
    loaded = load_model(tmp_path / "m", pretrained=towers)
    x = _images(1)
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(x).logits[-1], loaded(x).logits[-1])


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_broken_checkpoints_fail_clearly(tiny, tmp_path):
    good = save_model(tiny, tmp_path / "good")
    weights = (good / "model.safetensors").read_bytes()
    config = json.loads((good / "config.json").read_text())

    # truncated weights
    bad = tmp_path / "truncated"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(WsiprotoError, match="truncated") as err:
        load_model(bad)
    assert "model.safetensors" in _one_line(err)

    # truncated and the config's size/checksum removed: safetensors itself must refuse it
    del config["weights"]["bytes"], config["weights"]["sha256"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(WsiprotoError, match="safetensors") as err:
        load_model(bad)
    _one_line(err)

    # a config that does not match its tensors (other number of descriptions)
    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    (mismatch / "model.safetensors").write_bytes(weights)
    config["model"]["descriptions_per_class"] = 3
    (mismatch / "config.json").write_text(json.dumps(config))
    with pytest.raises(WsiprotoError, match="do not match config.json") as err:
        load_model(mismatch)
    assert "image_prototypes" in _one_line(err)

    # damaged JSON, missing directory, pickled weights for towers
    (mismatch / "config.json").write_text("{not json")
    with pytest.raises(WsiprotoError, match="not valid JSON"):
        load_model(mismatch)
    with pytest.raises(WsiprotoError, match="no config.json"):
        load_model(tmp_path / "absent")


def test_pretrained_file_is_local_and_safe(tmp_path):
    with pytest.raises(WsiprotoError, match="no such weights file"):
        create_model("dualproto-tiny", pretrained=tmp_path / "missing.bin")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.bin"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(WsiprotoError, match="refused without running it") as err:
        create_model("dualproto-tiny", pretrained=evil)
    assert "system" in _one_line(err)

    # a tensors-only state dict of the right architecture loads
    source = create_model("dualproto-tiny", seed=5, descriptions_per_class=1)
    state = tmp_path / "towers.pt"
    torch.save(source.backbone.clip.state_dict(), state)
    model = create_model("dualproto-tiny", pretrained=state, seed=6, descriptions_per_class=1)
    torch.testing.assert_close(model.backbone.clip.visual.conv1.weight,
                               source.backbone.clip.visual.conv1.weight)
    assert model.config.backbone.weights == "towers.pt"
