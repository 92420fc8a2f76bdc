"""Source code that makes ``import torch`` fail, for torch-free checks in a subprocess.

Example: ``subprocess.run([sys.executable, "-c", BLOCK_TORCH + "import dalle_flax"])``.

``None`` in ``sys.modules`` makes ``import torch`` fail and ``importlib.util.find_spec("torch")``
(what transformers' ``is_torch_available`` uses) return None; the meta-path finder also refuses
any torch submodule.
"""

import textwrap

__all__ = ["BLOCK_TORCH"]

BLOCK_TORCH = textwrap.dedent("""\
    import importlib.abc, sys
    class _NoTorch(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
          raise ImportError(f"torch is blocked in this test ({name})")
        return None
    sys.meta_path.insert(0, _NoTorch())
    sys.modules["torch"] = None
""")
