"""`wsiproto train`, `evaluate` and `pseudo-masks` end to end on generated BCSS-WSSS trees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from texture_sets import write_bcss_tree  # noqa: E402
from wsiproto.cli import main  # noqa: E402
from wsiproto.classes import get_class_table  # noqa: E402
from wsiproto.data import open_dataset, read_mask  # noqa: E402
from wsiproto.errors import WsiprotoError  # noqa: E402
from wsiproto.evaluate import calibrate_thresholds, mask_labels  # noqa: E402
from wsiproto.train import SimulatedInterrupt, TrainOptions, train  # noqa: E402

QUIET = dict(quiet=True, workers=0)


def weights(run: Path, which: str = "last") -> dict:
    return load_file(str(run / which / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    """Equal up to float rounding: bit-identical on an idle machine, but a loaded CPU lets MKL
    and OpenMP change their reduction order, which moves the last bits."""
    return a.keys() == b.keys() and all(
        torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5) for k in a)


def same_metrics(a: dict, b: dict, tol: float = 2e-3) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_metrics(a[k], b[k], tol) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= tol
    return a == b


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_bcss_tree(tmp_path_factory.mktemp("bcss") / "data", train=24, val=6, test=6)


@pytest.mark.parametrize("train_dir,val_dir", [("train", "val"), ("training", "valid"),
                                               ("train/img", "val")])
def test_layout_end_to_end(tmp_path, capsys, train_dir, val_dir):
    """Every BCSS-WSSS layout variant: train one short epoch, evaluate in both protocols,
    write pseudo masks; the run folder works as a model for evaluate and segment."""
    data = write_bcss_tree(tmp_path / "data", train=16, val=4, test=4, train_dir=train_dir,
                           val_dir=val_dir)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1",
                 "--batch-size", "8", "--workers", "0", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["best_epoch"] == 1 and summary["val_images"] == 4
    for name in ("train.json", "log.jsonl", "metrics.json", "best/config.json",
                 "best/model.safetensors", "last/trainer_state.pt"):
        assert (run / name).is_file(), name
    events = [json.loads(line)["event"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and "step" in events and "epoch" in events and events[-1] == "end"
    thresholds = json.loads((run / "best" / "config.json").read_text())["masks"]["thresholds"]
    assert len(thresholds) == 4 and all(0 <= t <= 1 for t in thresholds)

    for protocol in ("predicted", "oracle"):
        assert main(["evaluate", "--model", str(run), "--data", str(data), "--split", "test",
                     "--protocol", protocol, "--workers", "0", "--quiet"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert {"mIoU", "mDice", "FwIoU", "IoU"} <= set(result)
        assert set(result["IoU"]) == {"TUM", "STR", "LYM", "NEC", "background"}
        assert result["protocol"] == protocol and result["images"] == 4
        assert 0 <= result["mIoU"] <= 1
        # 4 images of 224 x 224 pixels, all counted once
        assert np.array(result["confusion_matrix"]).sum() == 4 * 224 * 224
        saved = json.loads((run / f"eval-test-{protocol}.json").read_text())
        assert saved["mIoU"] == result["mIoU"]

    out = tmp_path / "pseudo"
    assert main(["pseudo-masks", "--model", str(run), "--data", str(data), "--out", str(out),
                 "--quiet"]) == 0
    train_set = open_dataset(data, "train")
    table = get_class_table("bcss")
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == len(train_set)
    for path, labels in zip(sorted(train_set.paths), train_set.labels[np.argsort(train_set.paths)]):
        mask = read_mask(out / (Path(path).stem + ".png"), table)
        assert mask.shape == (224, 224)
        present = set(np.unique(mask).tolist()) - {4}
        # oracle protocol: only the patch's own labels can appear
        assert present <= set(np.flatnonzero(labels).tolist())
    assert json.loads((out / "manifest.json").read_text())["masks"] == len(train_set)

    from wsiproto.segment.predictor import load_predictor

    predictor = load_predictor(run, device="cpu")
    assert predictor.num_classes == 4 and predictor.source.endswith("best")


# Training processes that compute the same floats whatever else the machine does: one thread
# (a loaded CPU made MKL pick other thread counts, hence other reduction orders) and MKL's
# conditional numerical reproducibility (results independent of the buffers' alignment,
# which differs between processes).
REPRODUCIBLE = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "MKL_DYNAMIC": "FALSE", "MKL_CBWR": "COMPATIBLE"}


def train_process(out: Path, args: list[str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "wsiproto", "train", "--out", str(out),
                             *args, *extra], env={**os.environ, **REPRODUCIBLE},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill_and_resume_gives_the_uninterrupted_weights(tree, tmp_path):
    """A `wsiproto train` process killed (SIGKILL) after its first epoch, then resumed, ends
    with the weights and metrics of an uninterrupted run; the same seed twice gives the same
    metrics."""
    args = ["--data", str(tree), "--epochs", "4", "--batch-size", "8", "--workers", "0",
            "--seed", "3", "--quiet"]
    full = tmp_path / "full"
    proc = train_process(full, args)
    assert proc.wait(600) == 0, proc.stderr.read()

    killed = tmp_path / "killed"
    proc = train_process(killed, args)
    log = killed / "log.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and '"event": "epoch"' in log.read_text():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(killed / "last" / "trainer_state.pt", weights_only=True)
    assert 1 <= state["epoch"] < 4, "the run finished before it could be killed"
    assert not (killed / "metrics.json").exists()

    proc = train_process(killed, args, "--resume")
    assert proc.wait(600) == 0, proc.stderr.read()
    assert same_weights(weights(full), weights(killed))
    assert same_weights(weights(full, "best"), weights(killed, "best"))
    m_full = json.loads((full / "metrics.json").read_text())
    m_killed = json.loads((killed / "metrics.json").read_text())
    assert same_metrics(m_full["val"], m_killed["val"])
    assert m_full["best_epoch"] == m_killed["best_epoch"]
    epochs = [json.loads(x)["epoch"] for x in log.read_text().splitlines()
              if json.loads(x)["event"] == "epoch"]
    assert epochs == [1, 2, 3, 4]  # the log holds each epoch once

    again = tmp_path / "again"
    assert main(["train", "--out", str(again), *args]) == 0
    assert same_metrics(json.loads((again / "metrics.json").read_text())["val"], m_full["val"])


def test_interrupt_mid_epoch_and_feature_cache(tree, tmp_path):
    """With --cache-features: features are computed once per view, an interruption inside an
    epoch resumes to the uninterrupted weights, and the cached features are the backbone's."""
    base = dict(data=str(tree), epochs=2, batch_size=8, cache_features=True, cache_views=2,
                seed=1, **QUIET)
    train(TrainOptions(out=str(tmp_path / "a"), **base), echo=lambda m: None)
    with pytest.raises(SimulatedInterrupt):
        train(TrainOptions(out=str(tmp_path / "b"), stop_after_steps=4, **base), echo=lambda m: None)
    messages = []
    train(TrainOptions(out=str(tmp_path / "b"), resume=True, **base), echo=messages.append)
    assert not any("cached" in m for m in messages)  # the cache survived the interruption
    assert same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))

    from wsiproto.data.transforms import flip_rotate, to_tensor
    from wsiproto.model import create_model

    cache = np.load(tmp_path / "a" / "cache" / "features.npy", mmap_mode="r")
    assert cache.shape[:3] == (24, 2, 4) and bool(np.load(tmp_path / "a" / "cache" / "done.npy").all())
    model = create_model("dualproto-tiny", seed=1).eval()
    ds = open_dataset(tree, "train")
    rgb, _ = ds[5]
    for view, (k, flip) in enumerate([(0, False), (0, True)]):
        x = to_tensor(flip_rotate(rgb, None, k, flip)[0], model.config.mean, model.config.std)
        with torch.no_grad():
            blocks = model.backbone.visual_features(x[None])
        want = torch.stack(blocks, 1)[0].numpy()
        np.testing.assert_allclose(cache[5, view].astype(np.float32), want, atol=0.02, rtol=0.01)


def test_run_folder_guards(tree, tmp_path):
    run = tmp_path / "run"
    opts = dict(data=str(tree), epochs=1, batch_size=8, **QUIET)
    with pytest.raises(WsiprotoError, match="nothing to resume"):
        train(TrainOptions(out=str(run), resume=True, **opts), echo=lambda m: None)
    train(TrainOptions(out=str(run), **opts), echo=lambda m: None)
    with pytest.raises(WsiprotoError, match="already holds a training run"):
        train(TrainOptions(out=str(run), **opts), echo=lambda m: None)
    with pytest.raises(WsiprotoError, match=r"other settings .*lr"):
        train(TrainOptions(out=str(run), resume=True, **{**opts, "lr": 0.5}), echo=lambda m: None)
    train(TrainOptions(out=str(run), overwrite=True, **opts), echo=lambda m: None)
    assert (run / "best" / "config.json").is_file()
    with pytest.raises(WsiprotoError, match="dataset folder not found"):
        train(TrainOptions(data=str(tmp_path / "nope"), out=str(tmp_path / "r2")), echo=print)
    with pytest.raises(WsiprotoError, match="unknown preset"):
        train(TrainOptions(data=str(tree), out=str(tmp_path / "r3"), preset="resnet"), echo=print)


def test_cli_errors_are_one_line(tree, tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "dataset folder not found" in err
    code = main(["evaluate", "--model", str(tmp_path / "nomodel"), "--data", str(tree)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no such model folder" in err


def test_no_val_split_calibrates_on_training_labels(tmp_path):
    data = write_bcss_tree(tmp_path / "data", train=16, val=0, test=4)
    messages = []
    summary = train(TrainOptions(data=str(data), out=str(tmp_path / "run"), epochs=1,
                                 batch_size=8, **QUIET), echo=messages.append)
    assert any("no validation split" in m for m in messages)
    assert summary["calibrated_on"] == "16 training images" and "val" not in summary


def test_evaluate_scores_images_at_their_own_size(tmp_path):
    """Images larger than the tile are scored at the mask's resolution."""
    from PIL import Image

    from wsiproto.evaluate import evaluate_dataset
    from wsiproto.model import create_model

    root = tmp_path / "generic"
    (root / "img").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["image,TUM,STR,LYM,NEC,split"]
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(300, 260), (224, 224), (500, 230)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "img" / f"p{i}.png")
        mask = np.full((h, w), 4, np.uint8)
        mask[: h // 2] = i % 4
        Image.fromarray(mask).save(root / "masks" / f"p{i}.png")
        rows.append(f"img/p{i}.png,{int(i % 4 == 0)},{int(i % 4 == 1)},{int(i % 4 == 2)},0,test")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = open_dataset(root, "test", kind="generic")
    model = create_model("dualproto-tiny", seed=0)
    res = evaluate_dataset(model, ds)
    assert res.matrices["oracle"].matrix.sum() == 300 * 260 + 224 * 224 + 500 * 230
    assert res.probs.shape == (3, 4) and res.labels.tolist()[0] == [1, 0, 0, 0]


def test_calibrate_thresholds_by_hand():
    probs = np.array([[0.9, 0.2], [0.8, 0.3], [0.4, 0.6], [0.1, 0.7]])
    labels = np.array([[1, 0], [1, 0], [0, 1], [0, 0]])
    t = calibrate_thresholds(probs, labels)
    assert t[0] == pytest.approx(0.6)   # between 0.4 and 0.8 separates perfectly
    assert t[1] == pytest.approx(0.45)  # 0.6 and 0.7 both above; F1 = 2/3 either way, nearest 0.5
    # no positives: the default stays
    assert calibrate_thresholds(probs, np.zeros_like(labels)) == [0.5, 0.5]
    assert mask_labels(np.array([[0, 4], [2, 2]]), 4).tolist() == [1, 0, 1, 0]
