"""Runs :mod:`freeflows.bench.sampling`; options ``--quick`` and ``--out DIR``."""

from freeflows.bench import sampling
from freeflows.bench.common import main

if __name__ == "__main__":
    main(sampling.run, sampling.__doc__)
