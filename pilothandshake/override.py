"""``override``: marks a method that overrides a base class's hook (PEP 698).

The standard library's servers call hooks by name (``handle_error``, ``verify_request``
...): a typo or a rename in a subclass silently defines a new method and the base class's
hook runs instead (round 2 lost the control server's ``handle_error`` that way). Marking
each override lets ``mypy --strict`` report a marked method that overrides nothing.

``typing.override`` exists from Python 3.12 on. The type checker reads
``typing_extensions.override`` (mypy ships with it); at run time on older Pythons the
marker is a two-line decorator, so the package gains no dependency.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Callable, TypeVar

__all__ = ["override"]

if TYPE_CHECKING:
    from typing_extensions import override
elif sys.version_info >= (3, 12):
    from typing import override
else:
    _F = TypeVar("_F", bound=Callable[..., Any])

    def override(method: _F) -> _F:
        """Mark ``method`` as an override (checked by the type checker, not at run time)."""
        method.__override__ = True
        return method
