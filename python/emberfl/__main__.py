"""``python -m emberfl``: the ``emberfl`` command line (see :mod:`emberfl.cli`)."""

from __future__ import annotations

if __name__ == "__main__":
    from emberfl.cli import main

    raise SystemExit(main())
