"""dualproto-conch with CONCH-format weights (the conch-fork package, installed by the dev extra).

No CONCH weights can be downloaded here, so the checkpoint is a random CoCa built with the
package's exact ``conch_ViT-B-16`` config (448 px, decoder included) and saved the way CONCH's
``pytorch_model.bin`` is distributed: a flat ``torch.save``'d state dict without the captioning
decoder's tensors, position embeddings for the 28x28 grid of 448 px.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
package = pytest.importorskip("conch.open_clip_custom", reason="pip install 'wsiproto[conch]'")

from conftest import shared_file  # noqa: E402
from test_backbones import check_forward, check_round_trip, check_train_step  # noqa: E402
from test_cli import wsiproto  # noqa: E402
from wsiproto.errors import WsiprotoError  # noqa: E402
from wsiproto.model import create_model, load_model, save_model  # noqa: E402

SPOT = ("visual.trunk.blocks.5.attn.qkv.weight", "visual.trunk.patch_embed.proj.weight",
        "text.transformer.resblocks.11.mlp.c_fc.weight", "text.cls_emb", "text.text_projection",
        "visual.attn_pool_contrast.query")
MODEL_MPP = 4.0  # a coarse model keeps `wsiproto segment` on the real slide to a few tiles


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(path, {name: tensor} spot checks) of a CONCH-format random checkpoint."""
    from conch.open_clip_custom.factory import CFG_DIR

    cfg = json.loads((CFG_DIR / "conch_ViT-B-16.json").read_text())
    cfg.pop("custom_text")
    torch.manual_seed(7)
    coca = package.CoCa(**cfg)
    state = {k: v for k, v in coca.state_dict().items() if not k.startswith("text_decoder.")}
    assert state["visual.trunk.pos_embed"].shape == (1, 28 * 28 + 1, 768)
    path = tmp_path_factory.mktemp("conch") / "pytorch_model.bin"
    torch.save(state, path)
    spot = {k: state[k].clone() for k in SPOT + ("visual.trunk.pos_embed",)}
    spot["text.token_embedding.weight"] = state["text.token_embedding.weight"][:2000].clone()
    del coca, state
    yield path, spot
    path.unlink()


@pytest.fixture(scope="module")
def model(checkpoint):
    return create_model("dualproto-conch", pretrained=checkpoint[0], seed=0,
                        descriptions_per_class=1, mpp=MODEL_MPP)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return save_model(model, tmp_path_factory.mktemp("conch-model") / "model", half=True)


def test_conch_weights_load_and_come_back(model, checkpoint):
    from conch.open_clip_custom.coca_model import resize_pos_embed

    _, spot = checkpoint
    assert model.backbone.found.startswith("CONCH (CoCa ViT-B/16, 448-px position grid")
    assert model.config.backbone.weights == "pytorch_model.bin"
    bb = model.backbone
    assert (bb.image_size, bb.vision_width, bb.text_width, bb.context_length) == \
        ((224, 224), 768, 768, 128)
    assert bb.coca.text.token_embedding.weight.shape == (32007, 768)
    ours = bb.coca.state_dict()
    for name in SPOT:
        assert torch.equal(ours[name], spot[name]), name
    assert torch.equal(ours["text.token_embedding.weight"][:2000], spot["text.token_embedding.weight"])
    # 448-px position grid resampled to 224 px exactly as the conch package does it
    expected = {"visual.trunk.pos_embed": spot["visual.trunk.pos_embed"]}
    resize_pos_embed(expected, bb.coca)
    assert ours["visual.trunk.pos_embed"].shape == (1, 197, 768)
    assert torch.equal(ours["visual.trunk.pos_embed"], expected["visual.trunk.pos_embed"])


def test_conch_pyramid_reads_the_trunk_blocks(model):
    """The deepest pyramid input is the trunk's last block, before its final norm."""
    trunk = model.backbone.coca.visual.trunk
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        deepest = model.backbone.visual_features(x)[-1]
        tokens = trunk.forward_features(x)  # blocks + final norm, CLS first
    grid = trunk.norm(deepest.flatten(2).transpose(1, 2))
    torch.testing.assert_close(grid, tokens[:, 1:], rtol=1e-4, atol=1e-4)


def test_conch_forward_train_step_and_round_trip(model, tmp_path):
    check_forward(model)
    check_train_step(model)
    folder = save_model(model, tmp_path / "full")  # float32: exact
    check_round_trip(model, folder)
    shutil.rmtree(folder)


def test_conch_head_ships_without_conch_weights(model, checkpoint, tmp_path):
    """CONCH's weights may not be redistributed: a model saved without its towers is small and
    loads again with the user's own pytorch_model.bin."""
    folder = save_model(model, tmp_path / "head", include_backbone=False)
    assert (folder / "model.safetensors").stat().st_size < 60e6
    with pytest.raises(WsiprotoError, match="saved without its backbone"):
        load_model(folder)
    loaded = load_model(folder, pretrained=checkpoint[0])
    assert loaded.backbone.found == model.backbone.found
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(x).logits[-1], loaded(x).logits[-1], rtol=0, atol=0)


def test_conch_tokenizer_is_the_shipped_byte_level_bpe(model):
    """Ids equal those of the Rust tokenizer built from the JSON inside the conch-fork wheel
    (no download), 127 text slots plus the CLS slot, CONCH's special tokens."""
    from tokenizers import Tokenizer

    from conch.open_clip_custom.custom_tokenizer import DEFAULT_TOKENIZER, TOKENIZER_DIR

    texts = ["X X X X invasive carcinoma.", "TILs", "a histopathology image of"]
    ours = model.backbone.tokenize(texts)
    raw = Tokenizer.from_file(str(TOKENIZER_DIR / DEFAULT_TOKENIZER))
    assert ours.shape == (3, 128)
    for row, text in zip(ours, texts):
        ids = raw.encode(text).ids
        assert ids[0] == 1 and ids[-1] == 2  # <start_of_text> ... <end_of_text>
        assert row[:len(ids)].tolist() == ids and not row[len(ids):].any()  # <pad> = 0
    assert model.prompts.tokens.shape == (4, 128)


def test_conch_segments_the_real_slide(saved, tmp_path):
    slide = shared_file("slides", "CMU-1-Small-Region.svs")
    proc = wsiproto("segment", str(slide), "--model", str(saved), "--out", str(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "CMU-1-Small-Region"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["model"]["preset"] == "dualproto-conch"
    assert summary["tiles"]["run_now"] >= 1
    assert abs(sum(summary["class_percent_of_tissue"].values()) - 100) < 0.01
    import zarr

    tissue = zarr.open_group(str(folder / "CMU-1-Small-Region.ome.zarr"), mode="r")["labels/tissue"]
    labels = tissue["0"][...]
    assert labels.shape == (summary["label_frame"]["height"], summary["label_frame"]["width"])
    assert np.isin(labels, range(6)).all()
    geo = json.loads((folder / "CMU-1-Small-Region.geojson").read_text())
    assert geo["type"] == "FeatureCollection"
    assert all(f["properties"]["classification"]["color"] for f in geo["features"])
    assert (folder / "overlay.png").stat().st_size > 0


def test_missing_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "conch", None)
    monkeypatch.setitem(sys.modules, "conch.open_clip_custom", None)
    with pytest.raises(WsiprotoError, match=r"pip install 'wsiproto\[conch\]'") as err:
        create_model("dualproto-conch")
    assert "\n" not in str(err.value) and "conch-fork" in str(err.value)
