"""``python -m virchow_rt ...`` is ``virchow-rt ...`` (where the console script is not on PATH)."""

import sys

from virchow_rt.cli.main import main

sys.exit(main())
