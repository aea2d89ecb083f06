"""Pluggable names: one registry per family, exactly one default, no name twice."""

from __future__ import annotations

import pytest

from fleetserve.registry import Registered
from gateway.routing import RoutingPolicy
from workers.engines import Engine


def test_a_family_finds_its_members_and_its_default() -> None:
    class Shape(Registered):
        kind = "shape"

    class Square(Shape, name="square", default=True):
        pass

    class Circle(Shape, name="circle"):
        pass

    assert Shape.registry == {"square": Square, "circle": Circle}
    assert Shape.named(None) is Square and Shape.named("circle") is Circle
    with pytest.raises(KeyError):
        Shape.named("hexagon")


def test_a_second_default_or_a_name_used_twice_fails_at_import() -> None:
    class Shape(Registered):
        kind = "shape"

    class Square(Shape, name="square", default=True):
        pass

    with pytest.raises(TypeError, match="both the default shape"):

        class Circle(Shape, name="circle", default=True):
            pass

    with pytest.raises(TypeError, match="shape 'square' is registered twice"):

        class Other(Shape, name="square"):
            pass


def test_engines_and_policies_are_separate_families_with_one_default_each() -> None:
    assert Engine.default_name == "vllm" and RoutingPolicy.default_name == "least_load"
    assert not set(Engine.registry) & set(RoutingPolicy.registry)
