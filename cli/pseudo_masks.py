"""``wsiproto pseudo-masks``: palette PNG pseudo masks of a training split."""

from __future__ import annotations

EXAMPLE = "wsiproto pseudo-masks --model runs/bcss --data BCSS-WSSS --out BCSS-WSSS/pseudo"


def register(sub) -> None:
    from . import add_command
    from .evaluate import add_model_data_options

    p = add_command(sub, "pseudo-masks",
                    "write pseudo masks of the training split (input of a second-stage segmenter)",
                    EXAMPLE)
    p.add_argument("--model", required=True, help="model folder or `wsiproto train` run folder")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--out", required=True, help="folder for <patch stem>.png palette masks")
    p.add_argument("--protocol", default="oracle", choices=("oracle", "predicted"),
                   help="gate by each patch's image-level labels (oracle, default) or by the "
                        "model's calibrated presence (predicted)")
    add_model_data_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace masks made with other settings in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from wsiproto.pseudo_masks import write_pseudo_masks

    from .evaluate import open_model_and_split

    folder, device, model, data = open_model_and_split(args, "train")
    with tqdm(total=len(data), desc="pseudo masks", unit="img", disable=args.quiet,
              leave=False) as bar:
        manifest = write_pseudo_masks(model, data, args.out, protocol=args.protocol, tta=args.tta,
                                      crf=args.crf, batch_size=args.batch_size, device=device,
                                      autocast=device.startswith("cuda"), overwrite=args.overwrite,
                                      source=str(folder), progress=bar.update)
    print(f"{manifest['masks']} pseudo masks in {args.out} ({manifest['written_now']} written now)")
    return 0
