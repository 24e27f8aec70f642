import sys

from spectutor.cli import main

sys.exit(main())
