"""`python -m ingest` is the `usagepipe` console script."""

import sys

from ingest.cli import main

sys.exit(main())
