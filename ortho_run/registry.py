"""One plugin registry for every config group (timm style: ``model=resnet56`` is a name).

Methods, data sources, models, optimisers and schedules all use this class. A plugin file
registers itself with its schema (a dataclass); the registry discovers its plugins by
importing every module of its package on first use, so adding a plugin is one file (plus one
yaml in ``conf/<group>/`` for the ones users select):

    @METHODS.register("opl", schema=OPLConfig)
    class OPL(CE): ...

A schema's ``name`` field defaults to the plugin's name; a plugin registered without a schema
of its own (or with a schema shared by several plugins) gets a derived subclass whose ``name``
defaults to its name, so its yaml need restate nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Callable, Dict, Generic, List, Optional, TypeVar

from ortho_run.errors import ConfigError

T = TypeVar("T")

#: Bumped on every registration change; caches derived from the registries (the schema keys'
#: effects) are keyed on it, so a plugin registered late is never missing from them.
GENERATION = [0]


def schema_named(schema: type, name: str) -> type:
    """``schema`` itself if its ``name`` defaults to ``name``, else a subclass where it does."""
    fields = getattr(schema, "__dataclass_fields__", {})
    if "name" in fields and fields["name"].default == name:
        return schema
    cls_name = "".join(p.capitalize() for p in name.replace("-", "_").split("_")) + schema.__name__
    return dataclasses.make_dataclass(cls_name, [("name", str, dataclasses.field(default=name))],
                                      bases=(schema,))


class Registry(Generic[T]):
    """Name → plugin (a class or a builder function) and its schema.

    ``group``: the config group whose yaml files select these plugins (``conf/<group>/``), or
    None for plugins that are only asked for by name in code. ``package``: the package whose
    modules register plugins; each is imported once, on first lookup.
    """

    def __init__(self, kind: str, group: Optional[str] = None, package: Optional[str] = None,
                 base_schema: Optional[type] = None):
        self.kind, self.group, self.package, self.base_schema = kind, group, package, base_schema
        self._items: Dict[str, T] = {}
        self._schemas: Dict[str, type] = {}
        self._internal: set = set()
        self._discovered = package is None

    # --- registration -----------------------------------------------------------------
    def register(self, name: str, schema: Optional[type] = None,
                 internal: bool = False) -> Callable[[T], T]:
        """Decorator. ``internal``: asked for by name in code only (no yaml, not selectable)."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            base = schema or getattr(obj, "Config", None) or self.base_schema
            if base is not None:
                self._schemas[name] = schema_named(base, name)
                if isinstance(obj, type) and getattr(obj, "Config", None) is not None:
                    obj.Config = self._schemas[name]
            if internal:
                self._internal.add(name)
            if isinstance(obj, type):
                obj.plugin_name = name
            GENERATION[0] += 1
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Remove a plugin (tests register toy plugins and take them away again)."""
        self._items.pop(name, None)
        self._schemas.pop(name, None)
        self._internal.discard(name)
        GENERATION[0] += 1

    # --- discovery --------------------------------------------------------------------
    def discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{self.package}.{mod.name}")

    # --- lookup -----------------------------------------------------------------------
    def get(self, name: str) -> T:
        self.discover()
        try:
            return self._items[name]
        except KeyError:
            key = f"{self.group}.name" if self.group else self.kind
            raise ConfigError(f"unknown {self.kind} {name!r} ({key}); available: "
                              f"{', '.join(self.names())}") from None

    def schema(self, name: str) -> type:
        self.get(name)
        return self._schemas.get(name) or schema_named(self.base_schema, name)

    def names(self, internal: bool = False) -> List[str]:
        self.discover()
        return sorted(n for n in self._items if internal or n not in self._internal)

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._items
