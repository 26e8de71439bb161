"""The language model and its text: loading models and tokenizers, their transformer blocks and linear
layers (:mod:`.models`), the calibration and evaluation corpus (:mod:`.data`), perplexity
(:mod:`.evaluate`). Imports only :mod:`experiments.core`."""
