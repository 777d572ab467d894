"""The command lines: ``lineas-bake`` (main) and ``lineas-bake push`` (push). The top layer: it composes the others."""
