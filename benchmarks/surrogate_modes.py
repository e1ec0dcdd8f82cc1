"""Runs :mod:`freeflows.bench.surrogate_modes`; options ``--quick`` and ``--out DIR``."""

from freeflows.bench import surrogate_modes
from freeflows.bench.common import main

if __name__ == "__main__":
    main(surrogate_modes.run, surrogate_modes.__doc__)
