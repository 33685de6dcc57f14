"""`python -m loadtest.simulate`: the simulator without the neogate CLI."""

import sys

from loadtest.simulate.cli import main

sys.exit(main())
