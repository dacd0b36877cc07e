import sys

from flowvae.cli import main

sys.exit(main())
