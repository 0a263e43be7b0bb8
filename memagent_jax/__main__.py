"""`python -m memagent_jax` = the `memagent-jax` command."""

import sys

from memagent_jax.cli import main

sys.exit(main())
