"""`python -m worker.cli`: the `sms-worker` command."""

import sys

from worker.cli import main

sys.exit(main())
