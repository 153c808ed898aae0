"""``python -m mlaprop.cli``."""

import sys

from mlaprop.cli import main

sys.exit(main())
