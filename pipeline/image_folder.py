"""Images that records name, found in one folder: ``--images`` and ``--image-pattern`` of ``cm3 sft convert``.

A record's image reference (a file name, a relative path or an id) becomes ``root / pattern.format(ref)``. The
references come from downloaded files, so a name that leaves the folder is refused before anything is opened:
``OutsideRoot``, which the converters count as a skipped record. The check is on the resolved path (``..`` and
symbolic links followed, as the operating system would follow them), so neither ``../``, an absolute path nor a
link inside the folder that points out of it reaches a file elsewhere; the path opened is the resolved one.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from cm3.core.errors import InputError
from cm3.core.files import PathLike

ImageRef = str | int  # a file name, relative path or image id, as a record gives it


class OutsideRoot(LookupError):
    """A record's image name that resolves outside the images folder."""


class ImageFolder:
    """``root / pattern.format(ref)`` for every reference, never outside ``root``; calling it opens the image."""

    def __init__(self, root: PathLike, pattern: str = "{}"):
        self.root = Path(os.path.realpath(root))
        self.pattern = pattern

    def locate(self, ref: ImageRef) -> Path:
        """The image's resolved path (not opened); ``OutsideRoot`` if it leaves the folder, ``FileNotFoundError`` if
        no file can have its name, ``InputError`` if the pattern does not apply to the reference (a user error that
        no record can fix)."""
        try:
            name = self.pattern.format(ref)
        except (ValueError, IndexError, KeyError, TypeError) as err:
            raise InputError(f"--image-pattern {self.pattern!r} does not apply to the image reference {ref!r}: "
                             f"{type(err).__name__}: {err}") from err
        try:
            path = Path(os.path.realpath(self.root / name))
        except ValueError as err:  # a NUL byte
            raise FileNotFoundError(f"image {ref!r}: {err}") from err
        if path == self.root or not path.is_relative_to(self.root):
            raise OutsideRoot(f"image {ref!r} names {path}, outside the images folder {self.root}")
        return path

    def __call__(self, ref: ImageRef) -> Image.Image:
        """The image, fully read (a truncated file fails here, not later)."""
        with Image.open(self.locate(ref)) as image:
            image.load()
            return image.copy()
