"""Record: the base of pyvmm's small value classes (exits, slots, recipe steps, guests).

A subclass lists its fields in __slots__ and sets them in a plain __init__. That is what
a dataclass would generate, without importing dataclasses (and inspect, several ms per
process) and, for frozen ones, without one object.__setattr__ call per field on every
construction; a vCPU exit is built once per exit.
"""

from __future__ import annotations


class Record:
    __slots__ = ()

    def _values(self) -> tuple:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other._values() == self._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(
            f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"

    def replace(self, **changes):
        """A copy with some fields changed."""
        fields = {k: getattr(self, k) for k in self.__slots__}
        fields.update(changes)
        return type(self)(**fields)
