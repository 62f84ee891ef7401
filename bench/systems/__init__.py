"""The three systems under test, behind one interface (base.System)."""

from __future__ import annotations

from ..workspace import Workspace
from .autofs import Autofs
from .base import System
from .cvmfsd import Cvmfsd
from .direct import Direct

NAMES = ("direct", "autofs", "cvmfsd")
CONTROL = "direct2"  # a second direct mount, the A/A control of the warm scenarios


def make(name: str, ws: Workspace, tag: str = "", **kw: object) -> System:
    """A fresh, not yet set up, instance of system *name* with its own directory below ws."""
    cls: type[System] = {"direct": Direct, "autofs": Autofs, "cvmfsd": Cvmfsd,
                         CONTROL: Direct.control()}[name]
    return cls(ws, tag, **kw)


__all__ = ["CONTROL", "NAMES", "Autofs", "Cvmfsd", "Direct", "System", "make"]
