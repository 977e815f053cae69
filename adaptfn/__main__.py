"""``python -m adaptfn ...``: the ``adaptfn`` command line (:mod:`adaptfn.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
