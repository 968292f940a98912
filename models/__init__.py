"""Networks, configs, attribute definitions, checkpoint I/O and the registry (torch only)."""

from models.attributes import CELEBA_ATTRIBUTES, STGAN_ATTRIBUTES, condition_vector
from models.generators import AttributeGenerator, Encoded
from models.registry import ARCHITECTURES, build, get_architecture, get_preset

__all__ = [
    "ARCHITECTURES",
    "CELEBA_ATTRIBUTES",
    "STGAN_ATTRIBUTES",
    "AttributeGenerator",
    "Encoded",
    "build",
    "condition_vector",
    "get_architecture",
    "get_preset",
]
