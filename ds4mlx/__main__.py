"""``python -m ds4mlx``: the same CLI as the ``ds4mlx`` command."""

import sys

from .console import main

sys.exit(main())
