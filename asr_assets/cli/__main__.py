"""``python -m asr_assets.cli``: the ``asr-assets`` command."""

from . import console_main

console_main()
