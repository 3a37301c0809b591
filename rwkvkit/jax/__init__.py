"""rwkvkit's WKV operators for JAX (extra: ``pip install 'rwkvkit[jax]'``): RWKV-4, 5.2, 6 and 7.

The same contract as :mod:`rwkvkit.wkv` (argument meaning, fp32 state, [value, key] layout, the final state
always returned), each op a step-by-step ``lax.scan`` reference and a chunk-parallel form with a
hand-written backward, jit-able at any T. Initial states per row, shared, or a bank picked by
``state_map``: :mod:`rwkvkit.jax.state`.
"""
