"""``wsiproto info SLIDE``: what a slide is, as text or JSON."""

from __future__ import annotations

from .options import positive_float

import json

EXAMPLE = "wsiproto info slide.svs --json            # size, levels, mpp, bounds, tissue"


def register(sub) -> None:
    from . import add_command

    p = add_command(sub, "info", "describe a slide: backend, size, levels, mpp, tissue", EXAMPLE)
    p.add_argument("slide", help="slide file (.svs, .tif, .ndpi, .mrxs, .scn, DICOM ...)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--backend", default="auto", choices=("auto", "openslide", "tiffslide"),
                   help="slide reader (default: OpenSlide, else tiffslide)")
    p.add_argument("--mpp", type=positive_float, default=None,
                   help="pixel size in um/px to use when the slide has none")
    p.add_argument("--no-tissue", action="store_true", help="skip tissue detection")
    p.set_defaults(func=run)


def run(args) -> int:
    from wsiproto.slide import Slide
    from wsiproto.slide.info import describe, format_info

    with Slide(args.slide, backend=args.backend, mpp=args.mpp) as slide:
        info = describe(slide, tissue=not args.no_tissue)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
