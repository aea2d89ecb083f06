import sys

from fleetserve.cli import main

sys.exit(main())
