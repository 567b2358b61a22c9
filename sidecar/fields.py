"""Typed fields of a parsed TOML document, and the one-line errors that name them.

A wrong value reads ``<field>: expected <what>, got <value>``, where <field> is
the document's own name (``meters``), a section's (``[redis] timeout_ms``) or an
array entry's (``plans[0] 'pro': burst``). Rules: a bool is never an int or a
float; an absent field (or None: TOML has no null) takes its default, returned
unchecked; a value failing ``valid`` is refused like one of the wrong type.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, TypeGuard, TypeVar, overload

from sidecar.durations import parse_duration
from sidecar.errors import ConfigError

__all__ = ["Table", "expect"]

T = TypeVar("T")


class _Required(enum.Enum):
    REQUIRED = enum.auto()


_REQUIRED: Final = _Required.REQUIRED


def _is(value: object, kind: type[T]) -> TypeGuard[T]:
    if isinstance(value, bool):
        # bool subclasses int, yet `burst = true` is a mistake, never 1.
        return kind is not int and kind is not float and isinstance(value, kind)
    if kind is float:
        return isinstance(value, int | float)  # TOML writes 500 for 500.0
    return isinstance(value, kind)


def expect(
    value: object,
    kind: type[T],
    where: str,
    what: str,
    *,
    valid: Callable[[T], object] | None = None,
    echo: bool = True,
) -> T:
    """value if it is a kind (and valid); else ConfigError "<where>: expected <what>".

    echo=False leaves the value out of the message: it may hold a secret or a whole table.
    """
    if _is(value, kind) and (valid is None or valid(value)):
        return value
    raise ConfigError(
        f"{where}: expected {what}, got {value!r}" if echo else f"{where}: expected {what}"
    )


def _is_int_text(text: str, valid: Callable[[int], object] | None) -> bool:
    try:
        number = int(text)
    except ValueError:
        return False
    return valid is None or bool(valid(number))


@dataclass(frozen=True, slots=True)
class Table:
    """One TOML table and the name its errors give it ("" for the whole document)."""

    data: Mapping[str, Any]
    where: str = ""
    in_array: bool = field(default=False, kw_only=True)  # fields read "plans[0]: burst"

    @classmethod
    def entry(cls, value: object, where: str) -> Table:
        """An [[array]] entry such as plans[0], which must be a table."""
        return cls(expect(value, dict, where, "a table"), where, in_array=True)

    def named(self, name: str) -> Table:
        """This entry, its errors naming it too: plans[0] 'pro'."""
        return replace(self, where=f"{self.where} '{name}'")

    def path(self, name: str) -> str:
        if not self.where:
            return name
        return f"{self.where}: {name}" if self.in_array else f"{self.where} {name}"

    def section(self, name: str) -> Table:
        """The document's [name] table; absent is empty."""
        value = self.data.get(name)
        where = f"[{name}]"
        return Table(
            {} if value is None else expect(value, dict, where, "a table", echo=False), where
        )

    def only(self, known: Iterable[str]) -> Table:
        """This table, if it has no field outside known."""
        unknown = sorted(set(self.data) - set(known))
        if not unknown:
            return self
        name = unknown[0]
        if not self.where:
            raise ConfigError(f"{name}: unknown section or field")
        if self.in_array:
            raise ConfigError(f"{self.where}: unknown field {name!r}")
        raise ConfigError(f"{self.path(name)}: unknown field")

    @overload
    def string(
        self,
        name: str,
        default: str = ...,
        *,
        what: str,
        valid: Callable[[str], object] | None = None,
        echo: bool = True,
        env: str | None = None,
    ) -> str: ...

    @overload
    def string(
        self,
        name: str,
        default: None,
        *,
        what: str,
        valid: Callable[[str], object] | None = None,
        echo: bool = True,
        env: str | None = None,
    ) -> str | None: ...

    def string(
        self,
        name: str,
        default: str | Literal[_Required.REQUIRED] | None = _REQUIRED,
        *,
        what: str,
        valid: Callable[[str], object] | None = None,
        echo: bool = True,
        env: str | None = None,
    ) -> str | None:
        """A string; without a default, required. env, if not empty, wins over the file."""
        value = env or self.data.get(name)
        if value is None and default is not _REQUIRED:
            return default
        return expect(value, str, self.path(name), what, valid=valid, echo=echo)

    def integer(
        self,
        name: str,
        default: int,
        *,
        what: str,
        valid: Callable[[int], object] | None = None,
        env: str | None = None,
    ) -> int:
        """An integer, never a bool. env, if not empty, wins over the file."""
        if env:  # its errors quote the text as written: '0', not 0
            text = expect(env, str, self.path(name), what, valid=lambda t: _is_int_text(t, valid))
            return int(text)
        value = self.data.get(name)
        return default if value is None else expect(value, int, self.path(name), what, valid=valid)

    def number(
        self,
        name: str,
        default: float,
        *,
        what: str,
        valid: Callable[[float], object] | None = None,
    ) -> float:
        """A float or an integer, as a float; never a bool."""
        value = self.data.get(name)
        if value is None:
            return default
        return float(expect(value, float, self.path(name), what, valid=valid))

    @overload
    def boolean(self, name: str, default: bool) -> bool: ...

    @overload
    def boolean(self, name: str, default: None) -> bool | None: ...

    def boolean(self, name: str, default: bool | None) -> bool | None:
        """true or false; never 0 or 1."""
        value = self.data.get(name)
        return default if value is None else expect(value, bool, self.path(name), "true or false")

    def array(
        self,
        name: str,
        of: type[T],
        default: Sequence[T],
        *,
        what: str,
        valid: Callable[[T], object] | None = None,
        echo: bool = True,
    ) -> tuple[T, ...]:
        """A list whose every item is an `of` (and valid); a wrong item is the one quoted."""
        value = self.data.get(name)
        if value is None:
            return tuple(default)
        where = self.path(name)
        items = expect(value, list, where, what, echo=echo)
        return tuple(expect(item, of, where, what, valid=valid, echo=echo) for item in items)

    def duration(self, name: str, default: int) -> int:
        """A duration such as "90s", "15m", "24h" or "7d", in seconds (the default too)."""
        value = self.data.get(name)
        if value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ConfigError(f"{self.path(name)}: {exc}") from None
