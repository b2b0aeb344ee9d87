"""`python -m usagepipe` is the `usagepipe` console script."""

import sys

from usagepipe.cli import main

sys.exit(main())
