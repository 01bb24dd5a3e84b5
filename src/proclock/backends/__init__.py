"""Lock primitives behind ProcessLock and the decorators: flock(2) is the default."""

from ._base import Backend
from .flock import FLOCK, FlockBackend

__all__ = ["FLOCK", "Backend", "FlockBackend"]
