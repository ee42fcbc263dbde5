"""python -m proxy: the same as the metering-proxy command."""

import sys

from proxy.cli import main

sys.exit(main(sys.argv[1:]))
