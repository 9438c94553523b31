"""Object painters, one per kind of thing in the street; each draws image and label together."""
from .buildings import BuildingPainter
from .furniture import StreetFurniturePainter
from .ground import GroundPainter
from .people import PeoplePainter
from .vegetation import VegetationPainter
from .vehicles import VehiclePainter

__all__ = [
    'BuildingPainter', 'GroundPainter', 'PeoplePainter', 'StreetFurniturePainter', 'VegetationPainter', 'VehiclePainter'
]
