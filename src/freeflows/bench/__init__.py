"""Speed benchmarks (the tool layer): each module has ``run(out_dir, quick) -> dict`` and writes
``<name>.json`` and ``<name>.md`` to ``out_dir``. ``benchmarks/<name>.py`` are thin wrappers.

* :mod:`.train_step`: free-form vs exact maximum-likelihood vs autoencoder training step, vs D.
* :mod:`.surrogate_modes`: the two ways of computing the free-form surrogate, and torch.compile.
* :mod:`.log_prob`: exact log-density throughput, vmap(jacfwd) / vmap(jacrev) / a naive loop.
* :mod:`.sampling`: sampling throughput of every model.
"""

BENCHMARKS = ("train_step", "surrogate_modes", "log_prob", "sampling")
