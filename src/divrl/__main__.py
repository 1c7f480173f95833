"""`python -m divrl …` (and so `torchrun … -m divrl train …`, `accelerate launch -m divrl train …`)."""

import sys

from divrl.cli import main

sys.exit(main())
