"""`python -m pipeline COMMAND`: see `pipeline.ops.cli`."""

import sys

from pipeline.ops.cli import main

if __name__ == "__main__":
    sys.exit(main())
