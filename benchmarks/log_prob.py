"""Runs :mod:`freeflows.bench.log_prob`; options ``--quick`` and ``--out DIR``."""

from freeflows.bench import log_prob
from freeflows.bench.common import main

if __name__ == "__main__":
    main(log_prob.run, log_prob.__doc__)
