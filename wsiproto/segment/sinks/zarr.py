"""``ome-zarr``: the image, the class-label pyramid (and optional probabilities) in one
OME-Zarr store (:class:`wsiproto.export.ngff.SlidePyramidWriter`).

Each chunk writes its level-0 block and the pyramid levels that lie inside it; ``finish``
builds the small top levels and the NGFF metadata. With ``image`` (the default) every chunk of
the slide writes its pixels, tissue or not, so the image group is the whole slide region at
the model's resolution; chunks without tissue cost a read, never inference."""

from __future__ import annotations

import os
import shutil

from wsiproto.segment.sinks import ChunkOutput, Sink, SinkContext, Totals, register


@register("ome-zarr")
class OmeZarrSink(Sink):
    def __init__(self, ctx: SinkContext):
        from wsiproto.export.ngff import SlidePyramidWriter

        super().__init__(ctx)
        plan, opts = ctx.plan, ctx.opts
        self.store = f"{plan.name}.ome.zarr"
        path = ctx.partial / self.store
        self.resumed = ctx.resuming and path.is_dir()
        if self.resumed:
            self.writer = SlidePyramidWriter.open(path)
        else:
            # created beside it and renamed: a run killed while creating the store's arrays
            # leaves none, not a store a rerun cannot open
            tmp = path.with_name(path.name + ".new")
            SlidePyramidWriter(
                tmp, height=plan.grid.height, width=plan.grid.width, mpp=plan.model_mpp,
                classes=plan.classes, ngff_version=opts.ngff_version, chunk=opts.zarr_chunk,
                probabilities=opts.probabilities, image=opts.image, name=plan.name,
                overwrite=True)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
            self.writer = SlidePyramidWriter.open(path)
        self.levels = self.writer.inline_levels(plan.grid.chunk)

    @property
    def needs_image(self) -> bool:
        return self.ctx.opts.image

    def has(self, chunk) -> bool:
        return self.resumed

    def write(self, out: ChunkOutput) -> None:
        c = out.chunk
        if out.labels is None and out.rgb is None:
            return  # nothing but zeros: the store's fill value
        self.writer.write_block(c.y0, c.x0, out.labels, rgb=out.rgb, probs=out.probs,
                                levels=self.levels)

    def finish(self, totals: Totals) -> dict:
        workers = max(2, min(8, (os.cpu_count() or 2) - 1))
        self.writer.build_pyramid(num_workers=workers, start=self.levels + 1)
        self.writer.finalize()
        return {"files": [self.store], "ome_zarr": self.store}
