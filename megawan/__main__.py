import sys

from megawan.cli import main

sys.exit(main())
