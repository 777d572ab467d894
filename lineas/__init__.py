"""lineas: steering maps (format, hooks) and how to learn them (LinEAS, Linear-AcT)."""

from lineas.hooks import SteeringError, SteeringHandle, attach_affine, attach_maps, steered
from lineas.maps import FORMAT, FORMAT_VERSION, MapsFormatError, SiteMap, SteeringMaps, effective_maps, file_sha256

__version__ = "0.1.0"

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MapsFormatError", "SiteMap", "SteeringMaps", "effective_maps", "file_sha256",
    "SteeringError", "SteeringHandle", "attach_affine", "attach_maps", "steered", "__version__",
]
