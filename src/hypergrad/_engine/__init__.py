"""The engine: the K-step loop written once, and what it needs.

Modules, bottom to top (see the Architecture page of the docs):

- ``checks``: argument checks shared by every entry point.
- ``notices``: torch's own deprecation notices, kept from the user.
- ``randomness``: per-step seeds.
- ``batches``: ``Batches``, the batch of step k from any accepted argument.
- ``kernels``: ops without the derivative rules a hypergradient needs (attention's math
  backend; errors that name a module torch cannot differentiate twice).
- ``step``: the pure step function (inner gradient + optimizer update).
- ``compile``: the compiled fast path (``compile=True``).
- ``problem``: ``Problem``, ``Carry`` and ``run_steps``, the one loop.
- ``diagnosis``: finiteness checks and the replay that names the first nan/inf.
- ``hyper``: hyperparameters as differentiable inputs (``wrt``).

It stands on ``hypergrad._boundary`` (the name of the public call in progress, for messages),
``tree`` and ``optim``; nothing here imports ``hypergrad.methods`` or anything above it.
"""
