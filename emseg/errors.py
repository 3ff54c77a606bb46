"""Exceptions that carry a message a user can act on.

Every error raised for bad input names the file and says what to do; the CLI prints
``str(error)`` on one line and the napari plugin shows it as a notification.
"""

from __future__ import annotations


class EmsegError(Exception):
    """Base class for errors that emseg explains to the user."""


class InputError(EmsegError):
    """An input image, mask or folder that cannot be used as given."""


class ModelFileError(EmsegError):
    """A model file that is missing, not a model, or inconsistent."""


class OptionError(InputError, ValueError):
    """An option value (tile size, batch size, device, ...) that cannot be used; the CLI exits with 2."""
