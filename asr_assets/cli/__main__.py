"""``python -m asr_assets.cli``: the ``asr-assets`` command."""

import sys

from . import main

sys.exit(main())
