"""Speed benchmarks (the tool layer): each module has ``run(out_dir, quick) -> dict`` and writes
``<name>.json`` and ``<name>.md`` to ``out_dir``; ``freeflows bench NAME [--quick]`` runs it.

* :mod:`.train_step`: free-form vs exact maximum-likelihood vs autoencoder training step, vs D.
* :mod:`.surrogate_modes`: the two ways of computing the free-form surrogate, and torch.compile.
* :mod:`.log_prob`: exact log-density throughput, vmap(jacfwd) / vmap(jacrev) / a naive loop.
* :mod:`.autoregressive_timing`: sample vs density time of MAF, IAF, RealNVP and the free-form
  flow.
* :mod:`.density_cost`: the free-form flow's normalised ``log_prob`` against the paper variant, on
  trained runs (reused, or trained first).
* :mod:`.sampling`: sampling throughput of every model, and of trained CNFs against a trained
  free-form flow (``sampling_speed.json``; the runs are reused, or trained first).
"""

#: Every benchmark, in the order ``freeflows bench all`` runs them (``sampling`` collects the
#: rows of ``autoregressive_timing``).
BENCHMARKS = (
    "train_step",
    "surrogate_modes",
    "log_prob",
    "autoregressive_timing",
    "density_cost",
    "sampling",
)
