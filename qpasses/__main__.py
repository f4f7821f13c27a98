import sys

from qpasses.cli.commands import main

sys.exit(main())
