"""Reading and writing images: lazy page-by-page sources (read, source, tiff, zarr_store) and atomic writers
(write)."""
