"""Compressed models out of and into the harness: GGUF export (:mod:`.export_gguf`), compressed-tensors
export/import (:mod:`.export_ct`), the ``compress`` / ``eval`` / ``export`` commands on saved models
(:mod:`.saved_model_cli`), and lm-evaluation-harness tasks on a saved model (:mod:`.lm_eval_cli`)."""
