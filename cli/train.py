"""``wsiproto train``: DualProtoSeg from image-level labels into a run folder."""

from __future__ import annotations

from .options import non_negative_float, non_negative_int, positive_float, positive_int

EXAMPLE = ("wsiproto train --data BCSS-WSSS --preset dualproto-vitb16 --pretrained quilt.pt "
           "--out runs/bcss")


def register(sub) -> None:
    from . import add_command

    p = add_command(sub, "train", "train DualProtoSeg on a patch dataset (image-level labels)",
                    EXAMPLE)
    p.add_argument("--data", required=True,
                   help="dataset folder (BCSS-WSSS, LUAD-HistoSeg, WSSS4LUAD or patches + CSV)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log.jsonl, metrics)")
    p.add_argument("--preset", default="dualproto-tiny",
                   help="model preset: dualproto-tiny (random towers), dualproto-vitb16 "
                        "(OpenAI CLIP, QuiltNet), dualproto-plip, dualproto-conch (the paper's; "
                        "pip install 'wsiproto[conch]'); default: dualproto-tiny")
    p.add_argument("--pretrained", default=None,
                   help="local tower weights file (.safetensors, .bin, .pt); its family is "
                        "identified from the tensors and must match the preset")
    p.add_argument("--unfreeze", action="store_true",
                   help="train the vision and text towers too (default: frozen, as the method)")
    p.add_argument("--kind", default="auto",
                   choices=("auto", "bcss", "luad-histoseg", "wsss4luad", "generic"),
                   help="dataset layout (auto: detected from file names and masks)")
    p.add_argument("--csv", default=None, help="label CSV of a generic dataset")
    p.add_argument("--epochs", type=positive_int, default=None, help="default: the preset's (20)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="default: the preset's (64 for vitb16, 16 for tiny)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="AdamW learning rate, poly decay (default: 5e-5 vitb16, 1e-3 tiny)")
    p.add_argument("--weight-decay", type=non_negative_float, default=None, help="default: 1e-3")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order, augmentation")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help="data loading processes (default: cores - 1, at most 8)")
    p.add_argument("--val-split", default="auto", choices=("auto", "none", "val", "test"),
                   help="split for validation and checkpoint selection (auto: val when present)")
    p.add_argument("--max-val", type=positive_int, default=None,
                   help="validate on at most this many images per epoch (a fixed random subset)")
    p.add_argument("--select-by", default="oracle", choices=("oracle", "predicted"),
                   help="protocol whose val mIoU selects best/ (predicted: one more pass per epoch)")
    p.add_argument("--cache-features", action="store_true",
                   help="compute the frozen backbone's features once and train the head from them")
    p.add_argument("--cache-views", type=int, default=8, choices=(1, 2, 4, 8),
                   help="dihedral views cached per image (augmentation; default 8)")
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between log.jsonl lines")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import sys

    from wsiproto.train import TrainOptions, train

    opts = TrainOptions(
        data=args.data, out=args.out, preset=args.preset, pretrained=args.pretrained,
        unfreeze=args.unfreeze, kind=args.kind, csv=args.csv, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, seed=args.seed, device=args.device, workers=args.workers,
        resume=args.resume, overwrite=args.overwrite, val_split=args.val_split,
        select_by=args.select_by, max_val=args.max_val, cache_features=args.cache_features,
        cache_views=args.cache_views, log_every=args.log_every, quiet=args.quiet)
    summary = train(opts, echo=lambda m: print(f"wsiproto: {m}", file=sys.stderr))
    print(json.dumps(summary, indent=2))
    return 0
