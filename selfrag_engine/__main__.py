import sys

from selfrag_engine.cli import main

sys.exit(main())
