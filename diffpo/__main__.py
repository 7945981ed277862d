import sys

from diffpo.cli import main

sys.exit(main())
