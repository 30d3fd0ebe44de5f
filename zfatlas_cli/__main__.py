"""``python -m zfatlas_cli``: the same command as the ``zfatlas`` console script."""

import sys

from zfatlas_cli.main import main

sys.exit(main())
