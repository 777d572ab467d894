import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # lets tests import tiny.py

import pytest  # noqa: E402


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
