"""`cdc-run` as installs made before it moved to `pipeline.ops.cron` call it.

`pip install` writes the entry point's module into the script it generates, so an editable
install from before the move still calls `pipeline.cron:main` until it is reinstalled, and
systemd units may run `python -m pipeline.cron`.
"""

import sys

from pipeline.ops.cron import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
