"""A plain-data description of a slide, for ``wsiproto info`` and run summaries."""

from __future__ import annotations

from typing import Any


def describe(slide, *, tissue: bool = True) -> dict[str, Any]:
    """Backend, vendor, size, levels, mpp, objective, bounds, associated images, tissue."""
    info: dict[str, Any] = {
        "path": slide.source,
        "backend": slide.backend,
        "vendor": slide.vendor,
        "width": slide.dimensions[0],
        "height": slide.dimensions[1],
        "level_count": slide.level_count,
        "levels": [
            {"width": w, "height": h, "downsample": round(ds, 6)}
            for (w, h), ds in zip(slide.level_dimensions, slide.level_downsamples)
        ],
        "mpp": None if slide.mpp is None else round(slide.mpp, 6),
        "mpp_x": None if slide.mpp_xy is None else round(slide.mpp_xy[0], 6),
        "mpp_y": None if slide.mpp_xy is None else round(slide.mpp_xy[1], 6),
        "mpp_source": slide.mpp_source,
        "objective_power": slide.objective_power,
        "bounds": {
            "x": slide.bounds.x,
            "y": slide.bounds.y,
            "width": slide.bounds.width,
            "height": slide.bounds.height,
        },
        "associated_images": list(slide.associated_image_names),
    }
    if tissue:
        from wsiproto.slide.tissue import detect_tissue

        mask = detect_tissue(slide)
        info["tissue_fraction"] = round(mask.fraction, 4)
        info["tissue_area_mm2"] = (
            None if slide.mpp is None else round(mask.area_um2(slide.mpp) / 1e6, 4)
        )
    return info


def format_info(info: dict[str, Any]) -> str:
    """Human-readable lines for ``wsiproto info``."""
    def fmt(v: Any) -> str:
        return "unknown" if v is None else str(v)

    levels = ", ".join(
        f"{lv['width']}x{lv['height']} (/{lv['downsample']:g})" for lv in info["levels"]
    )
    b = info["bounds"]
    mpp = "unknown (pass --mpp)" if info["mpp"] is None else (
        f"{info['mpp_x']:g} x {info['mpp_y']:g} um/px ({info['mpp_source']})"
    )
    rows = [
        ("slide", info["path"]),
        ("backend", info["backend"]),
        ("vendor", fmt(info["vendor"])),
        ("size", f"{info['width']} x {info['height']} px"),
        ("levels", f"{info['level_count']}: {levels}"),
        ("mpp", mpp),
        ("objective", "unknown" if info["objective_power"] is None
         else f"{info['objective_power']:g}x"),
        ("bounds", f"x={b['x']} y={b['y']} {b['width']} x {b['height']} px"),
        ("associated", ", ".join(info["associated_images"]) or "none"),
    ]
    if "tissue_fraction" in info:
        tissue = f"{100 * info['tissue_fraction']:.1f}% of the slide"
        if info.get("tissue_area_mm2") is not None:
            tissue += f", {info['tissue_area_mm2']:.2f} mm^2"
        rows.append(("tissue", tissue))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
