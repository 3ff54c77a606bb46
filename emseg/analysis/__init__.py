"""Results as numbers and pictures: objects, 2D and 3D measurements, metrics, evaluation and training reports."""
