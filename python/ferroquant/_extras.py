"""Optional dependencies: which pip extra brings each import, and the one error that says so.

The core (`quantize`, `dequantize`, GGUF IO, the native runtime) needs only numpy and safetensors;
everything else arrives with an extra whose name says what it is for."""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> the extra that installs it (pyproject.toml [project.optional-dependencies]).
EXTRA_FOR = {
    "torch": "torch",
    "transformers": "hf",
    "accelerate": "hf",
    "gguf": "hf",
    "gensim": "eval",
    "matplotlib": "eval",
    "tqdm": "hf",
    "cuda": "cuda",
    "cuda.bindings": "cuda",
    "cuda.core": "cuda",
    "llama_cpp": "test",
    "ray": "distributed",
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""

    def __init__(self, module: str, purpose: str, extra: str) -> None:
        self.module, self.purpose, self.extra = module, purpose, extra
        super().__init__(f"{purpose} {self.short()}")

    def short(self) -> str:
        """The message without the purpose (the CLI already names the command)."""
        return (
            f"needs {self.module.split('.')[0]}, which is not installed: "
            f"pip install 'ferroquant[{self.extra}]'"
        )


def require(module: str, purpose: str, extra: str | None = None) -> ModuleType:
    """Import `module` or raise MissingExtra naming the extra to install.

    Only a missing top-level package counts as missing: an installed package that fails inside
    its own import is a real error and propagates as it is."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top and not module.startswith(e.name):
            raise  # the package is there; something it imports is not: show the real error
        raise MissingExtra(module, purpose, extra or EXTRA_FOR.get(module, top)) from None
