"""dalle_flax works without torch: nothing imports it; a pipeline loads and runs with it blocked."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from dalle_flax.testing.torch_blocker import BLOCK_TORCH

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "src" / "dalle_flax"
TINY = REPO / "tests" / "fixtures" / "tiny-dalle-mini"



def _import_time_torch_imports(path):
  """`import torch...` statements that run when the module is imported (not inside functions)."""
  found = []

  def visit(node):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        continue
      names = []
      if isinstance(child, ast.Import):
        names = [alias.name for alias in child.names]
      elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
        names = [child.module]
      found.extend(f"{path.relative_to(REPO)}:{child.lineno}" for n in names if n.split(".")[0] == "torch")
      visit(child)

  visit(ast.parse(path.read_text(encoding="utf-8")))
  return found


def test_no_module_imports_torch_at_import_time():
  files = sorted(PACKAGE.rglob("*.py"))
  assert len(files) > 10
  offenders = [hit for path in files for hit in _import_time_torch_imports(path)]
  assert offenders == [], f"torch imported at module level (use a lazy import in the function): {offenders}"


def test_import_and_pipeline_from_folder_with_torch_blocked(tmp_path_factory, tmp_path):
  if not (TINY / "config.json").is_file():
    pytest.skip("tests/fixtures/tiny-dalle-mini is missing; run scripts/make_tiny_pipeline.sh")
  cache_dir = tmp_path_factory.getbasetemp() / "dalle-flax-jax-cache"  # shared with the pipeline tests
  script = BLOCK_TORCH + textwrap.dedent(f"""
      import json
      import dalle_flax, transformers
      assert not transformers.utils.is_torch_available()
      pipe = dalle_flax.pipeline("text-to-image", model={str(TINY)!r})
      pipe.set_progress_bar_config(disable=True)
      tokens = pipe("a red apple", num_images_per_prompt=2, seed=5, output_type="tokens")
      images = pipe("a red apple", num_images_per_prompt=2, seed=5)
      assert [im.size for im in images] == [(64, 64)] * 2
      # transformers' own factory, given our loaded model and dtype=None, needs no torch either
      hf_pipe = transformers.pipeline("text-to-image", model=pipe.model, dtype=None)
      hf_pipe.set_progress_bar_config(disable=True)
      assert (hf_pipe("a red apple", num_images_per_prompt=2, seed=5, output_type="tokens") == tokens).all()
      try:
        dalle_flax.rerank_with_clip(images, "a red apple")
        clip_error = None
      except ImportError as e:
        clip_error = str(e)
      torch_modules = [m for m, v in sys.modules.items() if m.split(".")[0] == "torch" and v is not None]
      print(json.dumps({{"tokens": tokens.tolist(), "clip_error": clip_error, "torch_modules": torch_modules}}))
  """)
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "HF_HUB_OFFLINE": "1",
         "HF_HOME": str(tmp_path / "hf")}
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["torch_modules"] == []
  assert report["clip_error"] is not None and 'pip install "dalle-flax[torch]"' in report["clip_error"]
  tokens = report["tokens"]
  assert len(tokens) == 2 and all(len(row) == 16 and all(0 <= t < 64 for t in row) for row in tokens)
  assert tokens[0] != tokens[1]
  # the same folder and seed give the same images with torch installed (this process)
  import dalle_flax

  pipe = dalle_flax.pipeline("text-to-image", model=TINY)
  pipe.set_progress_bar_config(disable=True)
  assert pipe("a red apple", num_images_per_prompt=2, seed=5, output_type="tokens").tolist() == tokens
