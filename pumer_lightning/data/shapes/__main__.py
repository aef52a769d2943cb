"""``python -m pumer_lightning.data.shapes``: generate the shapes world (see :func:`.generate.main`)."""

import sys

from .generate import main

sys.exit(main())
