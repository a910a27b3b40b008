"""Python source that makes `import torch` and `import transformers` fail in the interpreter that runs it first
(`python -c NO_TORCH + code`): what a serving install without the training stack sees."""

NO_TORCH = """
import sys

class _NoTrainingStack:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is not installed in a serving install")

sys.meta_path.insert(0, _NoTrainingStack())
"""
