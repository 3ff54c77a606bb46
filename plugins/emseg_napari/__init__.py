"""emseg's napari plugin: reader, writer, sample data, and the Segment, Fine-tune and Pretrain widgets.

A thin layer over the ``emseg`` core (which imports no Qt): the npe2 manifest ``napari.yaml``
names the contributions; the widgets run emseg's plain-callback functions in worker threads.
Install with ``pip install "emseg[napari]"``.
"""

from __future__ import annotations

__all__ = ["SegmentWidget", "FinetuneWidget", "PretrainWidget", "get_reader", "write_labels", "make_sample_data"]


def __getattr__(name):
    # Lazy, so that napari reads the manifest (and the reader runs) without importing Qt.
    if name == "SegmentWidget":
        from ._segment import SegmentWidget
        return SegmentWidget
    if name == "FinetuneWidget":
        from ._finetune import FinetuneWidget
        return FinetuneWidget
    if name == "PretrainWidget":
        from ._pretrain import PretrainWidget
        return PretrainWidget
    if name == "get_reader":
        from ._reader import get_reader
        return get_reader
    if name == "write_labels":
        from ._writer import write_labels
        return write_labels
    if name == "make_sample_data":
        from ._sample import make_sample_data
        return make_sample_data
    raise AttributeError(f"module 'emseg_napari' has no attribute {name!r}")
