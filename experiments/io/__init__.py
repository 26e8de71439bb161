"""Compressed models out of and into the harness: GGUF export (:mod:`.export_gguf`), compressed-tensors
export/import (:mod:`.export_ct`), and the ``compress`` / ``eval`` / ``export`` commands on saved models
(:mod:`.saved_model_cli`)."""
