"""Exceptions raised by the image package."""


class ImageError(Exception):
    """Base class of every error raised by :mod:`csi.image`."""


class FormatError(ImageError):
    """An image is malformed: the message names what is wrong and where.

    Raised by the reader for any inconsistency found in untrusted input. It is the
    only exception type the reader lets escape for bad input.
    """


class TreeError(ImageError):
    """A tree cannot be represented as a composefs image (bad name, size, xattr...)."""


class DumpError(ImageError):
    """A composefs-dump text is malformed; the message carries the line number."""
