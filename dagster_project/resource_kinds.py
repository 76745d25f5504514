"""The base of a resource interface whose classes are told apart by one field (an SAE's ``source``, a
describer's ``backend``): constructing the interface itself with that field builds the class it names, so
``SAEResource(source="release", ...)`` is a :class:`~dagster_project.resources.ReleaseSAE`.

``resources_for`` (the composition root) and code that knows the kind construct the class directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

import dagster as dg


class KindedResource(dg.ConfigurableResource):
    """An interface sets ``KIND_FIELD`` (the field naming the kind), its default, the words an unknown kind is
    called in the error, the error type, and :meth:`kinds`; its implementations set none of them."""

    KIND_FIELD: ClassVar[str] = ""
    KIND_DEFAULT: ClassVar[str] = ""
    KIND_NAME: ClassVar[str] = "kind"
    KIND_ERROR: ClassVar[type[Exception]] = ValueError

    @classmethod
    def kinds(cls) -> Mapping[str, type[Self]]:
        """The class of each kind (an interface's registry)."""
        return {}

    def __new__(cls, *args: Any, **data: Any) -> Self:
        if "KIND_FIELD" not in cls.__dict__:  # an implementation: itself
            return super().__new__(cls)
        kind, kinds = data.get(cls.KIND_FIELD, cls.KIND_DEFAULT), cls.kinds()
        if kind not in kinds:
            raise cls.KIND_ERROR(f"unknown {cls.KIND_NAME} {kind!r}: use one of {sorted(kinds)}")
        return super().__new__(kinds[kind])
