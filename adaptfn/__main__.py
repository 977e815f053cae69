"""``python -m adaptfn ...``: the ``adaptfn`` command line (:mod:`adaptfn.cli`)."""

import sys

from .cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
