"""`python -m cifar_cnn` is the same as the `cifar-cnn` command."""

import sys

from .cli import main

sys.exit(main())
