import sys

from meshtls.proxy.main import main

sys.exit(main())
