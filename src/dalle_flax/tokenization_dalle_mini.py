"""DalleBartTokenizer: the tokenizer class named in DALL·E mini's ``tokenizer_config.json``.

Example: ``tokenizer = DalleBartTokenizer.from_pretrained("dalle-mini/dalle-mini")``.

The released repos (``dalle-mini/dalle-mini``, ``dalle-mini/dalle-mega``,
``boris/dalle-mini-tokenizer``) declare ``"tokenizer_class": "DalleBartTokenizer"``. In the
original code that name was a plain subclass of ``BartTokenizerFast``: byte-level BPE with
RoBERTa post-processing (``<s> ... </s>``), ``add_prefix_space=False``. transformers 5.x merged
the slow and fast tokenizers and made ``BartTokenizer`` an alias of ``RobertaTokenizer`` (backed
by the ``tokenizers`` library), so this class subclasses it with no behaviour change. Its only job
is to exist under the legacy name: once :func:`dalle_flax.processing_dalle_mini.register` has run
(importing ``dalle_flax`` does it), ``AutoTokenizer.from_pretrained`` resolves the legacy
``tokenizer_class`` to it.
"""

from __future__ import annotations

from transformers import BartTokenizer

__all__ = ["DalleBartTokenizer", "DalleBartTokenizerFast"]


class DalleBartTokenizer(BartTokenizer):
  """Byte-level BPE tokenizer of DALL·E mini / mega (``vocab.json`` + ``merges.txt``).

  Identical to transformers' ``BartTokenizer`` (``RobertaTokenizer`` in 5.x). DALL·E mini's text
  normalizer prefixes every prompt with one space, so the first word gets the ``Ġ`` prefix of
  the others even though ``add_prefix_space`` is False.

  Built from files, it takes transformers 4's ``vocab_file=`` / ``merges_file=`` names as well as
  5.x's ``vocab=`` / ``merges=`` (a path or the loaded object). 5.x's ``RobertaTokenizer`` quietly
  ignores the 4.x names and builds a tokenizer of the five special tokens alone, which maps every
  caption to ``<s> </s>``: a model trained with it never sees its text.
  """

  def __init__(self, vocab=None, merges=None, *args, vocab_file=None, merges_file=None, **kwargs):
    if vocab is None and vocab_file is not None:
      vocab = vocab_file
    if merges is None and merges_file is not None:
      merges = merges_file
    if (vocab is None) != (merges is None):
      given, missing = ("vocab", "merges") if merges is None else ("merges", "vocab")
      raise ValueError(f"DalleBartTokenizer got {given} but no {missing}: a byte-level BPE needs both "
                       "(vocab.json and merges.txt, or vocab= and merges=).")
    super().__init__(vocab, merges, *args, vocab_file=vocab_file, merges_file=merges_file, **kwargs)


# The original also had a "Fast" variant; in transformers 5.x both names are one class.
DalleBartTokenizerFast = DalleBartTokenizer
