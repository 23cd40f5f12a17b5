"""``wsiproto evaluate``: per-class IoU, mIoU, mDice and FwIoU on a split with masks."""

from __future__ import annotations

from .options import non_negative_int, positive_int

EXAMPLE = "wsiproto evaluate --model runs/bcss --data BCSS-WSSS --split test --protocol oracle"


def add_model_data_options(p) -> None:
    """Options of the commands that run a model over a dataset split (evaluate, pseudo-masks)."""
    p.add_argument("--kind", default="auto",
                   choices=("auto", "bcss", "luad-histoseg", "wsss4luad", "generic"))
    p.add_argument("--csv", default=None, help="label CSV of a generic dataset")
    p.add_argument("--tta", action="store_true", help="flip and brightness test-time augmentation")
    p.add_argument("--crf", action="store_true", help="dense CRF refinement (needs wsiproto[crf])")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")


def register(sub) -> None:
    from . import add_command

    p = add_command(sub, "evaluate",
                    "evaluate a model on a val/test split: one JSON object on stdout", EXAMPLE)
    p.add_argument("--model", required=True, help="model folder or `wsiproto train` run folder")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--split", default="test", choices=("val", "test"), help="default: test")
    p.add_argument("--protocol", default="predicted", choices=("predicted", "oracle"),
                   help="presence from the model's calibrated probabilities (predicted) or from "
                        "the ground-truth labels (oracle, the published protocol)")
    add_model_data_options(p)
    p.add_argument("--workers", type=non_negative_int, default=None, help="decoding processes")
    p.add_argument("--save", default=None,
                   help="where to save the JSON (default: MODEL/eval-SPLIT-PROTOCOL[-tta][-crf].json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def open_model_and_split(args, split: str):
    """``(model folder, device, model, dataset)`` for the commands that run a model over a split
    (``--model``, ``--device``, ``--data``, ``--kind``, ``--csv``)."""
    from wsiproto.data import open_dataset
    from wsiproto.model import load_model
    from wsiproto.segment.predictor import resolve_model_dir
    from wsiproto.train import resolve_device

    folder = resolve_model_dir(args.model)
    device = resolve_device(args.device)
    model = load_model(folder, device=device)
    data = open_dataset(args.data, split, kind=args.kind, csv=args.csv,
                        classes=model.config.classes)
    return folder, device, model, data


def run(args) -> int:
    import json
    from pathlib import Path

    from tqdm import tqdm

    from wsiproto.evaluate import evaluate_dataset
    from wsiproto.files import write_json_atomic
    from wsiproto.train import default_workers

    folder, device, model, data = open_model_and_split(args, args.split)
    workers = default_workers() if args.workers is None else args.workers
    with tqdm(total=len(data), desc=f"evaluate {args.split} ({args.protocol})", unit="img",
              disable=args.quiet, leave=False) as bar:
        res = evaluate_dataset(model, data, protocols=(args.protocol,), tta=args.tta, crf=args.crf,
                               batch_size=args.batch_size, workers=workers, device=device,
                               autocast=device.startswith("cuda"), progress=bar.update)
    summary = res.summary(args.protocol)
    result = {"mIoU": summary["mIoU"], "mDice": summary["mDice"], "FwIoU": summary["FwIoU"],
              "IoU": summary["IoU"], "Dice": summary["Dice"],
              "pixel_accuracy": summary["pixel_accuracy"], "protocol": args.protocol,
              "split": args.split, "images": len(data), "tta": args.tta, "crf": args.crf,
              "model": str(folder), "data": str(Path(args.data).expanduser().resolve()),
              "thresholds": model.config.thresholds if args.protocol == "predicted" else None,
              "confusion_matrix": summary["confusion_matrix"]}
    suffix = ("-tta" if args.tta else "") + ("-crf" if args.crf else "")
    run_dir = Path(args.model).expanduser()
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    save = Path(args.save) if args.save else run_dir / f"eval-{args.split}-{args.protocol}{suffix}.json"
    print(json.dumps(result), flush=True)  # first: a failed save must not lose the metrics
    try:
        write_json_atomic(save, result)
    except OSError as err:
        from wsiproto.errors import WsiprotoError

        raise WsiprotoError(f"cannot save the metrics ({err.strerror or err}); they are on "
                            "stdout above", path=save, hint="pass --save with a writable path") from None
    return 0
