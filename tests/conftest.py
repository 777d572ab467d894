import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # lets tests import tiny.py

import pytest  # noqa: E402

# test_gguf.py and test_gguf_inplace.py (marker gguf, deselected by default; the second imports the first's
# sentencepiece fixture) import llama.cpp's bindings, which `make setup-gguf` installs and `make setup` does not:
# without them the files are not collected at all.  `make test-gguf` then collects no test from them and fails
# on the others, so a missing install cannot pass for green.
collect_ignore = [] if importlib.util.find_spec("llama_cpp") else ["test_gguf.py", "test_gguf_inplace.py"]


@pytest.fixture(scope="session")
def tiny_pipeline_folder(tmp_path_factory):
    """``tiny_pipeline_folder("sd")``: a saved tiny pipeline folder (tiny_pipelines.py), built once per
    session and kind.  Treat it as read-only."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            from tiny_pipelines import save_pipeline

            built[kind] = save_pipeline(kind, tmp_path_factory.mktemp(f"pipe-{kind}") / kind)
        return built[kind]

    return get
