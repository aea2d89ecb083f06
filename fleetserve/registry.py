"""Pluggable classes that register themselves by name (engines, routing policies).

``class LeastLoadPolicy(RoutingPolicy, name="least_load", default=True)`` adds the
class to its family's registry; a family is the first class that subclasses
:class:`Registered` without a name (further classes without a name are shared bases of
members). The CLI's choices, the cluster file's checks
and ``--help`` are generated from the registry, so a name is written once, and a
family has exactly one default.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self


class Registered:
    registry: ClassVar[dict[str, type[Any]]]
    default_name: ClassVar[str]
    name: ClassVar[str]
    #: What one member is called in messages ("engine", "routing policy").
    kind: ClassVar[str] = "name"

    def __init_subclass__(
        cls, name: str | None = None, default: bool = False, **kwargs: object
    ) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:
            if Registered in cls.__bases__:  # the root of a family
                cls.registry = {}
                cls.default_name = ""
            return  # else a base class for members (gateway/routing.py: CacheAwarePolicy)
        if name in cls.registry:
            raise TypeError(f"{cls.kind} {name!r} is registered twice")
        if default and cls.default_name:
            raise TypeError(
                f"{cls.__name__} and {cls.registry[cls.default_name].__name__} are both the "
                f"default {cls.kind}"
            )
        cls.name = name
        cls.registry[name] = cls
        if default:
            # set on the family's root, where every member reads it
            root: Any = next(base for base in cls.__mro__ if "registry" in vars(base))
            root.default_name = name

    @classmethod
    def named(cls, name: str | None) -> type[Self]:
        """The member called ``name``; the family's default for None. KeyError if unknown."""
        return cls.registry[name or cls.default_name]
