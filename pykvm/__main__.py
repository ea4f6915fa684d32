import sys

from pykvm.cli import main

sys.exit(main())
