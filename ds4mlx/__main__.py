"""``python -m ds4mlx``: the same CLI as the ``ds4mlx`` command."""

import sys

from .cli import main

sys.exit(main())
