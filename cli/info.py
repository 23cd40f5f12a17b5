"""``wsiproto info SLIDE``: what a slide is, as text or JSON."""

from __future__ import annotations

import json

from .options import positive_float

SLIDE_HELP = ("slide file (.svs, .tif, .ndpi, .mrxs, .scn, .dcm ...), a folder holding a DICOM "
              "WSI series, or a URL (https://, s3://, any fsspec URL)")
BACKEND_HELP = "slide reader (default auto: the first registered reader that opens the slide)"


def backend_choices() -> tuple[str, ...]:
    """``auto`` and every registered slide reader (wsiproto.slide.backends)."""
    from wsiproto.slide.backends import backend_names

    return ("auto", *backend_names())

EXAMPLE = "wsiproto info slide.svs --json            # size, levels, mpp, bounds, tissue"


def register(sub) -> None:
    from . import add_command

    p = add_command(sub, "info", "describe a slide: backend, size, levels, mpp, tissue", EXAMPLE)
    p.add_argument("slide", help=SLIDE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--backend", default="auto", choices=backend_choices(), help=BACKEND_HELP)
    p.add_argument("--mpp", type=positive_float, default=None,
                   help="level-0 pixel size in um/px; overrides the slide's own")
    p.add_argument("--no-tissue", action="store_true", help="skip tissue detection")
    p.set_defaults(func=run)


def run(args) -> int:
    from wsiproto.slide import Slide
    from wsiproto.slide.info import describe, format_info

    with Slide(args.slide, backend=args.backend, mpp=args.mpp) as slide:
        info = describe(slide, tissue=not args.no_tissue)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
