import sys

from selfrag_engine.entrypoints.cli import main

sys.exit(main())
