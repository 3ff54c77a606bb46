"""emseg: U-Net segmentation for electron microscopy.

Quick use::

    import emseg
    model = emseg.load_model("default")    # the bundled model; or a path to a model file
    labels = model.predict(image)          # 2D page or 3D stack, numpy or dask
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "default_model_path", "Model", "ModelCard"]


def __getattr__(name):
    # Lazy: `import emseg` stays cheap (no torch import) until a model is needed.
    if name in ("load_model", "default_model_path", "Model"):
        from emseg.model import modelfile
        return getattr(modelfile, name)
    if name == "ModelCard":
        from emseg.model.card import ModelCard
        return ModelCard
    raise AttributeError(f"module 'emseg' has no attribute {name!r}")
