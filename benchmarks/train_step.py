"""Runs :mod:`freeflows.bench.train_step`; options ``--quick`` and ``--out DIR``."""

from freeflows.bench import train_step
from freeflows.bench.common import main

if __name__ == "__main__":
    main(train_step.run, train_step.__doc__)
