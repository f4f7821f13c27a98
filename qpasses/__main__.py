import sys

from qpasses.cli import main

sys.exit(main())
