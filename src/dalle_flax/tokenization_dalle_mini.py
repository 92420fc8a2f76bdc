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
  """


# The original also had a "Fast" variant; in transformers 5.x both names are one class.
DalleBartTokenizerFast = DalleBartTokenizer
