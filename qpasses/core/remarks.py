"""Structured remarks: what each pass applied, missed (and why), or observed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RemarkKind = Literal["applied", "missed", "analysis"]


@dataclass(frozen=True)
class Remark:
    kind: RemarkKind
    pass_name: str
    message: str
    nodes: tuple[str, ...] = ()
    reason: str = ""

    def __str__(self) -> str:
        where = f" [{', '.join(self.nodes)}]" if self.nodes else ""
        why = f": {self.reason}" if self.reason else ""
        return f"{self.kind:<8} {self.pass_name}: {self.message}{where}{why}"


@dataclass
class RemarkCollector:
    """Handed to a pass as ``ctx.remarks``-style helper bound to the pass name."""

    pass_name: str
    remarks: list[Remark] = field(default_factory=list)

    def applied(self, message: str, nodes: tuple[str, ...] | list[str] = (), reason: str = "") -> None:
        self.remarks.append(Remark("applied", self.pass_name, message, tuple(nodes), reason))

    def missed(self, message: str, nodes: tuple[str, ...] | list[str] = (), reason: str = "") -> None:
        self.remarks.append(Remark("missed", self.pass_name, message, tuple(nodes), reason))

    def analysis(self, message: str, nodes: tuple[str, ...] | list[str] = (), reason: str = "") -> None:
        self.remarks.append(Remark("analysis", self.pass_name, message, tuple(nodes), reason))
