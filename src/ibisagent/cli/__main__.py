"""``python -m ibisagent.cli ...`` == ``ibisagent ...``."""

import sys

from ibisagent.cli import main

sys.exit(main())
