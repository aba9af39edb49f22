"""`python -m loadtests.reliability ...` (see loadtests.reliability.cli)."""

import sys

from loadtests.reliability.cli import main

sys.exit(main())
