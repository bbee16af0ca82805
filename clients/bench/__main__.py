import sys

from loraplex.clients.bench.cli import main

sys.exit(main())
