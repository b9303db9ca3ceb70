"""``python -m metarl ...`` runs the ``metarl`` command."""

import sys

from metarl.app.cli import main

sys.exit(main())
