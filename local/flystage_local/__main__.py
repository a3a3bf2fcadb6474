"""``python -m flystage_local ...``: the same command as ``flystage local ...``."""

import sys

from flystage_local.command import main

if __name__ == "__main__":
    sys.exit(main())
