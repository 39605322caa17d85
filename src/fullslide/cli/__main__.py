import sys

from fullslide.cli import main

sys.exit(main())
