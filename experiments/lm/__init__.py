"""The language model and its text: loading models and tokenizers, their transformer blocks and linear
layers (:mod:`.models`), the calibration and evaluation corpus (:mod:`.data`), perplexity
(:mod:`.evaluate`), a zero-shot multiple-choice task on held-out text (:mod:`.tasks`). Imports only :mod:`experiments.core`."""
