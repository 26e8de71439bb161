"""Compression methods. Inside, each module imports only those listed before it:

- :mod:`.spec`: what a method is (``MethodSpec``, ``parse_spec``), the family interface and registry,
  the storage-format registry, the compression report.
- :mod:`.algorithms`: the layer-wise algorithms on one weight (pure torch; :mod:`.algorithms.hessian` is
  the calibration Hessian they share) and model-level structured pruning.
- :mod:`.families`: one module per compression family, registered on import.
- :mod:`.compress`: the driver, ``compress_model``.

Outside, it imports only :mod:`experiments.core` and :mod:`experiments.lm`. Importing any module of this
package first runs this file, which imports :mod:`.families`: the built-in families are registered
before a spec is parsed.
"""
from experiments.methods import families  # noqa: F401  (registers the built-in families)
