"""One registry pattern for everything chosen by name: flows (vector and image), models,
likelihoods, priors, flow-prior families, optimizers and datasets.

    FLOWS = Registry("flow")

    @FLOWS.register("planar")
    def _planar(dim, steps, context_dim, options): ...   # the stack of `steps` steps

    FLOWS["planar"]            # the builder, or a one-line ValueError listing the choices
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object (a class or a builder function); names are matched case-insensitively."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator (or call on an object): add the object under ``name``."""

        def add(item: T) -> T:
            key = name.lower()
            if key in self._items and self._items[key] is not item:  # the same object again is harmless
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[key] = item
            return item

        return add

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[str(name).lower()]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._items)}") from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)
