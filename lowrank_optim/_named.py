"""Option objects chosen by name: one registry rule for projectors and moment formats.

A projector (``projection.projector``) and a moment format (``optim.moments``) are frozen dataclasses whose
fields are their options. Users name one (``"svd"``, ``"8bit"``), pass an object, or a state dict carries
the plain form :func:`to_state` writes (the name, or a dict of the name and the options that differ), so
that ``torch.load(weights_only=True)`` reads it. :class:`NamedRegistry` turns any of these back into an
object, with the same refusals for both kinds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Generic, TypeVar

__all__ = ["NamedRegistry", "to_state"]

T = TypeVar("T")


def to_state(option: Any) -> str | dict[str, Any]:
    """``option`` (a frozen dataclass with a class-level ``name``) as plain values: its name when every
    field has its default, else ``{"name": ..., **fields}``."""
    fields = dataclasses.fields(option)
    options = {field.name: getattr(option, field.name) for field in fields}
    defaults = {field.name: getattr(type(option)(), field.name) for field in fields}
    if options == defaults:
        return option.name
    return {"name": option.name, **options}


class NamedRegistry(Generic[T]):
    """Classes of one kind by their ``name``. ``kind`` is the argument users set (``projector``), ``base``
    the class every member derives from, ``example`` an object expression for the refusal message."""

    def __init__(self, kind: str, base: type[T], example: str) -> None:
        self.kind, self.base, self.example = kind, base, example
        self.classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Make ``cls`` available under ``cls.name`` (usable as a class decorator)."""
        name = getattr(cls, "name", "")
        if not name:
            raise ValueError(f"{self.base.__name__} class {cls.__name__} has no name.")
        self.classes[name] = cls
        return cls

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self.classes)

    def resolve(self, value: Any, where: str = "") -> T:
        """The object ``value`` names: a registered name, an object of :attr:`base`, or the plain form
        :func:`to_state` writes (``where`` says which param group, for messages)."""
        if isinstance(value, self.base):
            return value
        if isinstance(value, dict) and value.get("name") in self.classes:
            options = {key: item for key, item in value.items() if key != "name"}
            return self._build(self.classes[value["name"]], options, where)
        if isinstance(value, str) and value in self.classes:
            return self.classes[value]()
        raise ValueError(
            f"Invalid {self.kind}{where}: {value!r}. Must be one of {', '.join(self.classes)}, or a "
            f"{self.base.__name__} (e.g. {self.example})."
        )

    def _build(self, cls: type[T], options: dict[str, Any], where: str) -> T:
        """``cls(**options)``, with ``where`` added to its validation messages."""
        known = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"Invalid {self.kind}{where}: {getattr(cls, 'name', '')!r} has no option {unknown[0]!r}. "
                f"Its options: {', '.join(sorted(known)) or 'none'}."
            )
        try:
            return cls(**options)
        except ValueError as error:
            if not where:
                raise
            head, _, tail = str(error).partition(":")
            raise ValueError(f"{head}{where}:{tail}") from None
