"""Model card templates used by ``push_to_hub`` (rendered with jinja2).

Example: ``render_model_card("dallebart.md", repo_id="me/my-dalle", ...)``.

The templates ship inside the package so an installed wheel can render them; the repository's
top-level ``model_cards/`` folder holds the cards of the known released checkpoints.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

__all__ = ["render_model_card"]


def render_model_card(template_name: str, **context: Any) -> str:
  """Renders ``template_name`` (a file in this folder) with ``context``.

  Raises:
    FileNotFoundError: no template of that name ships with dalle_flax.
    ImportError: jinja2 is not installed.
  """
  try:
    import jinja2
  except ImportError as e:  # pragma: no cover - jinja2 is a core dependency
    raise ImportError("Rendering model cards needs jinja2: pip install jinja2") from e
  folder = resources.files(__name__)
  template_file = folder / template_name
  if not template_file.is_file():
    available = sorted(p.name for p in folder.iterdir() if p.name.endswith(".md"))
    raise FileNotFoundError(f"No model card template {template_name!r}; available: {available}.")
  env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
  return env.from_string(template_file.read_text()).render(**context)
