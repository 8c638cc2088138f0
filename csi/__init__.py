"""composefs-csi: read-only, content-addressed volumes for Kubernetes pods."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("composefs-csi")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

DRIVER_NAME = "csi.composefs.io"
