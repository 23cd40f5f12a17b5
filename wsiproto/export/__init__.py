"""Writers of the segmentation outputs: OME-Zarr pyramids (ngff), QuPath GeoJSON (geojson), reports.

Submodules are imported on demand (zarr, rasterio and shapely are heavy)::

    from wsiproto.export.ngff import SlidePyramidWriter
    from wsiproto.export.geojson import GeoJSONWriter
"""
