import sys

from flystage.cli import main

sys.exit(main())
