"""Compression methods: the families and their registry (:mod:`.families`), the layer-wise algorithms
(:mod:`.algorithms`) and the driver that compresses a model (:mod:`.compress`). Imports only
:mod:`experiments.core` and :mod:`experiments.lm`."""
