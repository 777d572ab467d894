"""The one way a test asks for the ``onnx`` extra.

The transformers 5 environment (``make test-tf5``, ``.venv-tf5``) has no onnx extra by design:
optimum-onnx 0.1.0, the newest release, requires transformers < 4.58.  There the ONNX tests skip
because the package is absent, not because something failed; ``make test`` runs them in the
transformers 4.57 environment, which has the extra.  Under transformers 5 the exporter itself says
why it cannot run (``tests/test_transformers_compat.py``).
"""

import pytest

REASON = ("needs the onnx extra (optimum-onnx, transformers < 4.58): absent by design in the transformers 5 "
          "environment; make test runs these tests")


def require_onnx_extra():
    return pytest.importorskip("optimum.onnxruntime", reason=REASON)
