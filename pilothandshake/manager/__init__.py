"""The trust handshake state machine (SPEC sections 5-9, 14-16), in small modules.

``Manager`` (``core``) is the public face; ``decide`` holds the rules of SPEC 6 and 7 as
pure functions; ``auth``, ``binding``, ``replay`` and ``intake`` turn received input into
what a decision reads; ``effects`` carries out what it asks for; ``state`` holds the lock
and the working state. docs/DESIGN.md draws the map.
"""

from .clock import Clock, SystemClock
from .core import Manager
from .droplog import DropLog

__all__ = ["Clock", "DropLog", "Manager", "SystemClock"]
