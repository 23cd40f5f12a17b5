"""Every registered preset (every backbone family), as timm tests every registered model.

Random towers (no weights needed): forward shapes at the four levels, the prompt path against
the towers' own text encoder, a training step that moves prompts and prototypes and nothing
frozen, and an exact save/load round trip. A preset added to ``wsiproto/model/presets`` is
tested here the moment it exists. ViT-B towers are slow on a CPU: one image per pass, one
description per class, one model per preset at a time.
"""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")

from wsiproto.model import (  # noqa: E402
    BackboneConfig,
    create_model,
    list_families,
    list_presets,
    load_model,
    save_model,
)

SIZES = [28, 56, 112, 224]


def _needs(preset: str) -> None:
    if preset == "dualproto-conch":
        pytest.importorskip("conch.open_clip_custom", reason="pip install 'wsiproto[conch]'")


@pytest.fixture(scope="module", params=list_presets())
def model(request):
    _needs(request.param)
    return create_model(request.param, seed=0, descriptions_per_class=1)


def _image(seed: int = 0):
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_the_families_and_presets():
    assert list_families() == ["conch", "open_clip"]
    assert {"dualproto-tiny", "dualproto-vitb16", "dualproto-plip", "dualproto-conch"} <= \
        set(list_presets())


def check_forward(model) -> None:
    """Four token grids of the tower's geometry; logits and CAMs at the four levels."""
    bb = model.backbone
    grid = (bb.image_size[0] // bb.patch_size[0], bb.image_size[1] // bb.patch_size[1])
    model.eval()
    with torch.inference_mode():
        blocks = bb.visual_features(_image())
        out = model.forward_blocks(blocks, bb.image_size)
    assert [tuple(b.shape) for b in blocks] == [(1, bb.vision_width, *grid)] * 4
    assert len(out.logits) == len(out.cams) == 4
    for logits, cams, size in zip(out.logits, out.cams, SIZES):
        assert logits.shape == (1, 4) and cams.shape == (1, 4, size, size)
        assert torch.isfinite(cams).all()


def test_forward_shapes_at_four_levels(model):
    check_forward(model)


def test_prompt_path_matches_the_towers_text_encoder(model):
    """encode_prompts(token_embedding(t), t) is the family's own text encoder (the CoOp path
    changes only the embeddings of the context slots)."""
    bb = model.backbone
    tokens = bb.tokenize(["a histopathology image of tumor necrosis.", "TILs", "fibrous stroma"])
    with torch.no_grad():
        ours = bb.encode_prompts(bb.token_embedding(tokens), tokens)
        theirs = bb.encode_text(tokens)
    assert ours.shape == (3, bb.embed_dim)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    lengths = bb.token_lengths(tokens)
    assert lengths[1] < lengths[0] and not bb.truncated(tokens).any()


def check_train_step(model) -> None:
    """One AdamW step changes the prompts, prototypes and head, and no frozen tower tensor."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert not model.backbone.towers().training  # frozen towers stay in eval mode
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(not n.startswith("backbone.") for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-3)
    loss, _ = model.loss(model(_image(1), cams=False), torch.tensor([[1.0, 0, 1, 0]]))
    loss.backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    after = model.state_dict()
    for key in ("prompts.ctx", "prompts.proj.weight", "image_prototypes", "refiner.inp.weight"):
        assert not torch.equal(before[key], after[key]), key
    frozen = [k for k in before if k.startswith("backbone.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    model.load_state_dict(before)
    model.eval()


def check_round_trip(model, folder) -> None:
    """load_model(folder) of a saved ``model`` predicts bit-identically."""
    loaded = load_model(folder)
    assert type(loaded.backbone) is type(model.backbone)
    assert loaded.config.backbone.to_dict() == model.config.backbone.to_dict()
    model.eval()
    with torch.inference_mode():
        a, b = model(_image(2)), loaded(_image(2))
    for x, y in zip(a.logits + a.cams, b.logits + b.cams):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_train_step_moves_prompts_and_prototypes_not_towers(model):
    check_train_step(model)


def test_save_load_round_trip_is_exact(model, tmp_path):
    folder = save_model(model, tmp_path / "m")
    check_round_trip(model, folder)
    shutil.rmtree(folder)  # up to 800 MB of towers


def test_configs_saved_before_families_still_load():
    """A backbone dict without 'family' (every config written before the registry) is an
    open_clip one; the saved form names the family."""
    old = {"open_clip_name": None, "open_clip_cfg": {"embed_dim": 8}, "quick_gelu": False,
           "blocks": None, "freeze": True, "weights": None}
    config = BackboneConfig.from_dict(old)
    assert config.family == "open_clip" and config.options["open_clip_cfg"] == {"embed_dim": 8}
    assert config.to_dict() == {"family": "open_clip", **old}
    with pytest.raises(Exception, match="unknown conch backbone settings"):
        BackboneConfig.from_dict({"family": "conch", "quick_gelu": True})
