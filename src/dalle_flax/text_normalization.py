"""DALL·E mini's caption normalizer: 23 small, ordered, pure text steps.

Example: ``TextNormalizer.from_pretrained("dalle-mini/dalle-mini")("A #SunsetBeach 😀")``.

The steps reproduce ``dalle_mini.model.text.TextNormalizer`` (dalle-mini 0.1.5, reference §5.1)
so that prompts are tokenized exactly as the released models saw them in training. Each step is
a module-level function of one string; :class:`TextNormalizer` chains them. Two departures from
the original, both deliberate:

* ``<person>`` replacement (step 6) is seedable. The original drew from the unseeded global
  ``random`` module, so the same caption could normalize differently between runs. Here the
  default ``seed=0`` makes every call a pure function of its input; pass a ``random.Random`` to
  share one random stream across calls, or ``seed=None`` for the original unseeded behaviour.
* The hashtag word list (``enwiki-words-frequency.txt``) is injected, never downloaded by a
  constructor. Without a list, hashtags only lose their ``#`` (they are not split into words)
  and a message is logged once per normalizer. :meth:`TextNormalizer.from_pretrained` fetches
  the file from a model folder or Hub repo, and tolerates its absence.

Outputs depend on the installed ``ftfy``, ``emoji`` and ``unidecode`` versions (emoji names in
particular); the golden fixtures were made with ftfy 6.3.1, emoji 2.16.0 and unidecode 1.4.0.
"""

from __future__ import annotations

import html
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import emoji
import ftfy
from unidecode import unidecode

from .hub_utils import HubOptions, resolve_file

__all__ = ["WORD_FREQUENCIES_FILE", "TextNormalizer", "WordSplitter"]

logger = logging.getLogger(__name__)

WORD_FREQUENCIES_FILE = "enwiki-words-frequency.txt"

# Replacements for a lone <person> (CC12M captions), weighted by their Wikipedia counts.
_PERSON_WORDS = ("a person", "someone", "somebody")
_PERSON_COUNTS = (282265, 121194, 12219)

# Placeholders protect characters from the punctuation steps; "xtokx" never repeats a letter 4
# times, so step 18 leaves it intact.
_MARK = "xtokx"
_DOT, _QUOTE, _SLASH = f"{_MARK}dot{_MARK}", f"{_MARK}quote{_MARK}", f"{_MARK}slash{_MARK}"

_UNKNOWN_WORD_COST = math.inf  # the original's 9e999, which Python reads as inf


# --- the 23 steps, in order -------------------------------------------------------------------


def fix_text_encoding(text: str) -> str:
  """Step 1: repairs mojibake and odd unicode with ``ftfy.fix_text``."""
  return ftfy.fix_text(text)


def unescape_html(text: str) -> str:
  """Step 2: decodes HTML entities twice (``&amp;lt;`` -> ``<``)."""
  return html.unescape(html.unescape(text))


def demojize(text: str) -> str:
  """Step 3: writes emoji as ``:name_with_underscores:`` before unidecode would drop them."""
  return emoji.demojize(text)


def transliterate(text: str) -> str:
  """Step 4: transliterates to ASCII with ``unidecode``."""
  return unidecode(text)


def lowercase(text: str) -> str:
  """Step 5."""
  return text.lower()


_PERSON_RUN = re.compile(r"<person>([,\s]*(and)*[,\s]*<person>)+")


def replace_person_tokens(text: str, rng: random.Random | None = None) -> str:
  """Step 6: CC12M ``<person>`` tokens: runs become " people ", single ones a weighted pick.

  Args:
    text: lowercased text.
    rng: source of the picks; None uses the global ``random`` module (the original, unseeded).

  Returns:
    The text with every ``<person>`` replaced.
  """
  text = _PERSON_RUN.sub(" people ", text)
  draw = (rng or random).choices
  while "<person>" in text:
    text = text.replace("<person>", f" {draw(_PERSON_WORDS, weights=_PERSON_COUNTS)[0]} ", 1)
  return text


_WIKI_REF_START = re.compile(r"\A\s*\[\d+\]")
_WIKI_REF_END = re.compile(r"\[\d+\]\s*\Z")


def remove_wiki_reference(text: str) -> str:
  """Step 7: drops a Wikipedia-style ``[n]`` at the very start or end (WIT captions)."""
  return _WIKI_REF_END.sub("", _WIKI_REF_START.sub("", text))


def replace_html_tags(text: str) -> str:
  """Step 8: replaces ``<...>`` tags with a space."""
  return re.sub(r"<[^<]+?>", " ", text)


def remove_urls(text: str) -> str:
  """Step 9: removes ``http...`` up to the next whitespace."""
  return re.sub(r"http\S+", "", text)


def remove_thousands_separators(text: str) -> str:
  """Step 10: ``1,000,000`` -> ``1000000`` (two passes, as matches cannot overlap)."""
  for _ in range(2):
    text = re.sub(r"(\d),(\d{3})", r"\1\2", text)
  return text


def protect_tokens(text: str) -> str:
  """Step 11: shields dots inside words/numbers, short-form apostrophes and date slashes."""
  text = re.sub(r"(\w)\.(\w)", rf"\1{_DOT}\2", text)
  text = re.sub(r"'(?=([stdm]|(ll)|(re)|(ve))\b)", _QUOTE, text)
  return re.sub(r"(\d)/(\d)", rf"\1{_SLASH}\2", text)


def space_special_chars(text: str) -> str:
  """Step 12: ``a-b`` -> ``a b``; spaces around ``% & / $ *``."""
  text = re.sub(r"(\w)-(\w)", r"\1 \2", text)
  return re.sub(r"([%&/$*])", r" \1 ", text)


def expand_hashtags(text: str, split_words: Callable[[str], str] | None = None) -> str:
  """Step 13: ``#word`` -> ``split_words(word)``; without a splitter only the ``#`` goes."""
  if split_words is None:
    return re.sub(r"#(\w+)", r"\1", text)
  return re.sub(r"#(\w+)", lambda match: split_words(match.group(1)), text)


def blank_ignored_chars(text: str) -> str:
  """Step 14: ``_``, ``#`` and backslash become spaces."""
  return re.sub(r"[_#\\]", " ", text)


def space_quotes(text: str) -> str:
  """Step 15: every remaining ``'``, ``"`` or backtick becomes a spaced double quote."""
  return re.sub(r"['\"`]", ' " ', text)


def punctuation_to_commas(text: str) -> str:
  """Step 16: ``( ) [ ] . , | : ; ? ! = + ~ - / { }`` become commas."""
  return re.sub(r"[()\[\].,|:;?!=+~\-/{}]", ",", text)


def restore_tokens(text: str) -> str:
  """Step 17: undoes step 11."""
  return text.replace(_DOT, ".").replace(_QUOTE, "'").replace(_SLASH, "/")


def collapse_repeated_chars(text: str) -> str:
  """Step 18: a non-digit repeated 4+ times becomes one (3 stay: roman numerals like VIII)."""
  return re.sub(r"(\D)(\1{3,})", r"\1", text)


def merge_quotes(text: str) -> str:
  """Step 19: runs of quotes and surrounding spaces become one spaced quote."""
  return re.sub(r'(\s*"+\s*)+', ' " ', text)


def merge_commas(text: str) -> str:
  """Step 20: runs of commas and surrounding spaces become ``", "``."""
  return re.sub(r"(\s*,+\s*)+", ", ", text)


def collapse_whitespace(text: str) -> str:
  """Step 21: any whitespace run (tabs, newlines) becomes one space."""
  return re.sub(r"\s+", " ", text)


def strip_edge_commas(text: str) -> str:
  """Step 22: strips, then drops one trailing and one leading comma."""
  text = text.strip()
  if text.endswith(","):
    text = text[:-1]
  if text.startswith(","):
    text = text[1:]
  return text.strip()


def prefix_space(text: str) -> str:
  """Step 23: exactly one leading space, so the first word tokenizes like the others ("Ġword")."""
  return " " + text


# --- hashtag splitting -----------------------------------------------------------------------


class WordSplitter:
  """Splits run-together words (``"sunsetbeach"`` -> ``"sunset beach"``) by dynamic programming.

  A word costs ln(rank + 1), rank being its 0-based line in a frequency-sorted word list; any
  other substring costs infinity. The cheapest segmentation wins, ties going to the shorter last
  piece. Input is first cut at characters outside ``[a-zA-Z0-9']``; after splitting, a piece
  ``'s`` is glued back to the word before it and adjacent digit runs are merged.

  Args:
    words: words ordered from most to least frequent. A word listed twice keeps its last rank.

  Raises:
    ValueError: ``words`` is empty.
  """

  def __init__(self, words: Iterable[str]):
    self._cost = {str(word): math.log(rank + 1) for rank, word in enumerate(words)}
    if not self._cost:
      raise ValueError(
          "WordSplitter needs at least one word, got an empty list; pass the lines of "
          f"{WORD_FREQUENCIES_FILE} (most frequent first)."
      )
    self._max_len = max(len(word) for word in self._cost)

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> WordSplitter:
    """Reads a ``word [count]`` per line file; only the first column and line order are used."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return cls(line.split()[0] for line in lines if line.strip())

  @property
  def words(self) -> list[str]:
    """The words, most frequent first."""
    return sorted(self._cost, key=self._cost.__getitem__)

  def __call__(self, text: str) -> str:
    pieces = re.split(r"[^a-zA-Z0-9']+", text)
    return " ".join(word for piece in pieces for word in self.split(piece))

  def split(self, text: str) -> list[str]:
    """Returns the cheapest segmentation of ``text`` (no separators inside), post-processed."""
    n = len(text)
    best_cost = [0.0] * (n + 1)  # best_cost[i]: cheapest segmentation of text[:i]
    best_len = [0] * (n + 1)  # length of the last piece of that segmentation
    for end in range(1, n + 1):
      best_cost[end], best_len[end] = min(
          (best_cost[end - size] + self._cost.get(text[end - size:end].lower(), _UNKNOWN_WORD_COST),
           size)
          for size in range(1, min(end, self._max_len) + 1)
      )
    words: list[str] = []  # right to left
    end = n
    while end > 0:
      piece = text[end - best_len[end]:end]
      glue = piece != "'" and words and (
          words[-1] == "'s" or (piece[-1].isdigit() and words[-1][0].isdigit())
      )
      if glue:
        words[-1] = piece + words[-1]
      else:
        words.append(piece)
      end -= len(piece)
    return words[::-1]


# --- the normalizer ---------------------------------------------------------------------------


class TextNormalizer:
  """Normalizes captions and prompts the way DALL·E mini / mega were trained.

  Args:
    word_frequencies_path: an ``enwiki-words-frequency.txt``-style file (one word per line, most
      frequent first) for splitting hashtags. Read on the first hashtag, not here.
    word_list: the same words given directly; exclusive with ``word_frequencies_path``.
    seed: randomness of ``<person>`` replacement. An int (default 0) seeds a fresh generator on
      every call, so a given text always normalizes the same way; a ``random.Random`` is used as
      one stream across calls; None uses the unseeded global ``random`` like the original.

  Raises:
    ValueError: both word sources are given, or ``word_list`` is empty.
    FileNotFoundError: ``word_frequencies_path`` does not exist.
  """

  def __init__(
      self,
      word_frequencies_path: str | os.PathLike | None = None,
      word_list: Iterable[str] | None = None,
      seed: int | random.Random | None = 0,
  ):
    if word_frequencies_path is not None and word_list is not None:
      raise ValueError(
          "Pass either word_frequencies_path or word_list to TextNormalizer, not both."
      )
    if seed is not None and not isinstance(seed, (int, random.Random)):
      raise TypeError(
          f"seed must be an int, a random.Random or None, got {type(seed).__name__}."
      )
    self._words_path: Path | None = None
    self._splitter: WordSplitter | None = None
    if word_frequencies_path is not None:
      self._words_path = Path(word_frequencies_path)
      if not self._words_path.is_file():
        raise FileNotFoundError(
            f"word_frequencies_path {str(self._words_path)!r} is not a file; pass the path of "
            f"{WORD_FREQUENCIES_FILE}, or omit it to keep hashtags unsplit."
        )
    elif word_list is not None:
      self._splitter = WordSplitter(word_list)
    self.seed = seed
    self._warned_no_words = False

  @classmethod
  def from_pretrained(
      cls,
      folder_or_repo_id: str | os.PathLike,
      *,
      revision: str | None = None,
      cache_dir: str | os.PathLike | None = None,
      local_files_only: bool = False,
      token: str | bool | None = None,
      subfolder: str = "",
      force_download: bool = False,
      seed: int | random.Random | None = 0,
  ) -> TextNormalizer:
    """Builds a normalizer with the word list of a model folder or Hub repo, if it has one.

    Args:
      folder_or_repo_id: a local folder or a Hub repo id such as ``"dalle-mini/dalle-mini"``.
      revision: branch, tag or commit of the repo.
      cache_dir: Hugging Face cache folder.
      local_files_only: never touch the network.
      token: Hub token for private repos.
      subfolder: folder inside the repo / folder holding the file.
      force_download: re-download even if cached.
      seed: see the class arguments.

    Returns:
      A normalizer; without ``enwiki-words-frequency.txt`` it keeps hashtags unsplit.
    """
    options = HubOptions(revision=revision, cache_dir=cache_dir, token=token,
                         local_files_only=local_files_only, force_download=force_download,
                         subfolder=subfolder)
    path = resolve_file(folder_or_repo_id, WORD_FREQUENCIES_FILE, options, required=False)
    if path is None:
      logger.info(
          "%s has no %s: hashtags will be kept unsplit.", folder_or_repo_id, WORD_FREQUENCIES_FILE
      )
    return cls(word_frequencies_path=path, seed=seed)

  @property
  def has_word_list(self) -> bool:
    """Whether hashtags are split into words."""
    return self._splitter is not None or self._words_path is not None

  def save_word_frequencies(self, folder: str | os.PathLike) -> Path | None:
    """Writes the hashtag word list as ``folder/enwiki-words-frequency.txt``.

    Returns:
      The written path, or None when the normalizer has no word list.
    """
    if not self.has_word_list:
      return None
    target = Path(folder) / WORD_FREQUENCIES_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    if self._words_path is not None:
      if not (target.exists() and target.samefile(self._words_path)):
        shutil.copyfile(self._words_path, target)
    elif self._splitter is not None:
      target.write_text("".join(f"{word}\n" for word in self._splitter.words), encoding="utf-8")
    return target

  def __call__(self, text: str) -> str:
    """Returns the normalized text; it is ASCII and always starts with exactly one space."""
    if not isinstance(text, str):
      raise TypeError(f"TextNormalizer expects a str, got {type(text).__name__}.")
    text = fix_text_encoding(text)  # 1
    text = unescape_html(text)  # 2
    text = demojize(text)  # 3
    text = transliterate(text)  # 4
    text = lowercase(text)  # 5
    text = replace_person_tokens(text, self._person_rng())  # 6
    text = remove_wiki_reference(text)  # 7
    text = replace_html_tags(text)  # 8
    text = remove_urls(text)  # 9
    text = remove_thousands_separators(text)  # 10
    text = protect_tokens(text)  # 11
    text = space_special_chars(text)  # 12
    text = expand_hashtags(text, self._word_splitter(text))  # 13
    text = blank_ignored_chars(text)  # 14
    text = space_quotes(text)  # 15
    text = punctuation_to_commas(text)  # 16
    text = restore_tokens(text)  # 17
    text = collapse_repeated_chars(text)  # 18
    text = merge_quotes(text)  # 19
    text = merge_commas(text)  # 20
    text = collapse_whitespace(text)  # 21
    text = strip_edge_commas(text)  # 22
    return prefix_space(text)  # 23

  def __repr__(self) -> str:
    words = self._words_path or ("<word_list>" if self._splitter else None)
    return f"{type(self).__name__}(word_frequencies={words!s}, seed={self.seed!r})"

  def _person_rng(self) -> random.Random | None:
    if isinstance(self.seed, random.Random):
      return self.seed
    return None if self.seed is None else random.Random(self.seed)

  def _word_splitter(self, text: str) -> WordSplitter | None:
    if self._splitter is None and self._words_path is not None and "#" in text:
      self._splitter = WordSplitter.from_file(self._words_path)
    if self._splitter is None and not self._warned_no_words and "#" in text:
      self._warned_no_words = True
      logger.warning(
          "Hashtags are kept unsplit (only '#' is removed): this TextNormalizer has no word "
          "list. Use TextNormalizer.from_pretrained(<model folder or repo>) or pass "
          "word_frequencies_path=<%s> to split them like the original.", WORD_FREQUENCIES_FILE,
      )
    return self._splitter

