"""End-to-end demo on the embedded SmolLM2-135M-Instruct: learn, bake, evaluate, check runtimes.

``python -m lineas.demo`` (or ``make demo``, which also sets up the venv):

1. learn negative -> positive maps with ``lineas-train`` (LinEAS, and Linear-AcT
   on the same data for comparison);
2. bake the LinEAS maps at strength 1 with ``lineas-bake --format hf,onnx``;
3. evaluate both methods at strengths 0, 0.5 and 1 (sample generations, VADER
   sentiment, perplexities; see :mod:`lineas.evaluate`);
4. reload the baked HF checkpoint with plain transformers and the ONNX graph in
   ONNX Runtime, check their greedy tokens against the hooked model, and time
   base / hooked / baked generation in the same run;
5. write ``results/<run>/results.json`` and ``summary.md``.

The pieces: :mod:`.pipeline` (the steps), :mod:`.runtimes` (step 4), :mod:`.report` (summary.md), and
:mod:`.__main__` (the command line).
"""
