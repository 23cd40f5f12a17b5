"""``wsiproto demo``: the sample slide end to end with what wsiproto can do today."""

from __future__ import annotations

EXAMPLE = "wsiproto demo                              # fetch the sample slide and describe it"


def register(sub) -> None:
    from . import add_command

    p = add_command(
        sub, "demo", "fetch the sample slide (CMU-1-Small-Region) and run wsiproto on it", EXAMPLE
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from wsiproto.sample import sample_slide
    from wsiproto.slide import Slide
    from wsiproto.slide.info import describe, format_info

    path = sample_slide()
    with Slide(path) as slide:
        print(format_info(describe(slide)))
    return 0
