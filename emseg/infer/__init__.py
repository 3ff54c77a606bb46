"""Prediction: tiling and blending (tiling), the device pipeline (predictor, preprocess, alignment), files
(runner), volumes (volume, volume_run) and clusters (distributed)."""
