import sys

from selftok.shapes.cli import main

sys.exit(main())
