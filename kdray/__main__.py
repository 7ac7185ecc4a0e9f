import sys

from kdray.cli import main

sys.exit(main())
