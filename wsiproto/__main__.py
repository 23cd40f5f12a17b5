"""``python -m wsiproto`` is the ``wsiproto`` command."""

import sys

from wsiproto.cli import main

if __name__ == "__main__":
    sys.exit(main())
