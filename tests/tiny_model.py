"""A tiny random Llama with a word-level tokenizer and generated text, saved to a directory: the model
the command-line, Ray and saved-point tests run sweeps on (``build_tiny``)."""
import random
from pathlib import Path

import torch

WORDS = ("the a of and to in was her she he it that not be as with had for his you my at but is on "
         "have all by so which this were very no said from they or been would there an one could much "
         "more must what will than when who any such only Elinor Emma Darcy Anne").split()


def build_tiny(root: Path, sweep_yaml: str, *, words=WORDS, trailing_newline: bool = False,
               eos_token: str | None = None):
    """(model dir, text file, sweep file) under ``root``: a 2-layer random Llama (seed 0) saved with
    ``save_pretrained``, 600 lines of 12 words drawn from ``words`` (seed 0), and ``sweep_yaml``.
    ``eos_token``: a word appended to the vocabulary as the tokenizer's EOS token (lm-eval needs a BOS or
    an EOS token); without it the tokenizer has neither."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(words))}}
    if eos_token is not None:
        vocab[eos_token] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"eos_token": eos_token} if eos_token is not None else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **special).save_pretrained(root / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(600))
    (root / "text.txt").write_text(text + ("\n" if trailing_newline else ""))
    (root / "tiny.yaml").write_text(sweep_yaml)
    return root / "model", root / "text.txt", root / "tiny.yaml"
