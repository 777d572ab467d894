"""llama.cpp as a verification candidate, through llama-cpp-python run in a process of its own.

A GGUF file is checked the way every other export is: :func:`llamacpp_runner` makes the loaded
model an ``(input_ids, attention_mask) -> logits`` runner for :func:`bake.verify.check.compare` (each row
evaluated alone, up to its last real token: llama.cpp takes no attention mask, and probes are
right-padded), and :func:`greedy_decode` decodes token by token through llama.cpp's own KV cache,
which is what a user of the file runs.

llama.cpp runs in a child process (:mod:`bake.formats.llamacpp_worker`) where torch is never imported: its
native threads then never share a process with torch's, and a native crash of llama.cpp becomes a
:class:`LlamaCppCrashed` error naming the signal, not the death of the bake.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bake.errors import VerificationError
from bake.formats.children import end_child, start_child
from lineas.threads import pick_threads

N_CTX = 512  # longest probe (33 tokens) or greedy prompt plus its new tokens fits with room to spare
WORKER = Path(__file__).with_name("llamacpp_worker.py")
# Run the worker file by path with the interpreter's own import path minus the working directory, so
# neither the ``bake`` package (which imports torch) nor a stray module in the cwd is imported there.
_BOOTSTRAP = ("import runpy, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


class LlamaCppCrashed(VerificationError):
    """llama.cpp's process died (a native crash) while it ran a GGUF file: the file could not be checked,
    so the bake fails as an unverified one does (exit 3, nothing written)."""


class LlamaCppLoadError(VerificationError, ValueError):
    """llama.cpp refused to load the GGUF file just written: it cannot be checked, so the bake fails as an
    unverified one does (exit 3, nothing written); a ``ValueError`` as it always was for API callers."""


def script_command(script: Path, *args) -> list[str]:
    """This interpreter running ``script`` by file path with ``args`` (torch and ``bake`` not imported there)."""
    return [sys.executable, "-c", _BOOTSTRAP, str(script), *(str(a) for a in args)]


def worker_command(path: Path, *, n_ctx: int, threads: int, f32_cache: bool, vocab_only: bool = False) -> list[str]:
    return script_command(WORKER, path, n_ctx, threads, "1" if f32_cache else "0", *(["vocab"] if vocab_only else []))


class LlamaCppProcess:
    """A GGUF file loaded by llama.cpp in a child process (see :mod:`bake.formats.llamacpp_worker`)."""

    def __init__(self, path: Path, *, n_ctx: int, threads: int, f32_cache: bool, vocab_only: bool = False):
        self.path = Path(path)
        # stderr to a file, not a pipe: llama.cpp's own logging could fill a pipe nobody reads and stall it
        self._stderr = tempfile.TemporaryFile()
        # bound to this process: ended by __exit__/kill on any exception, by the kernel if this process is killed
        self._proc = start_child(worker_command(self.path, n_ctx=n_ctx, threads=threads, f32_cache=f32_cache,
                                                vocab_only=vocab_only),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        try:
            try:
                hello = self._reply("loading")
            except LlamaCppCrashed as e:
                hello = {"ok": False, "error": str(e)}
        except BaseException:  # Ctrl-C, SIGTERM while llama.cpp loads: it must not outlive this process
            self.kill()
            raise
        if not hello.get("ok"):
            self.close()
            raise LlamaCppLoadError(f"llama.cpp could not load {self.path}: {hello.get('error')}")
        self._n_vocab = int(hello["n_vocab"])
        self.torch_loaded = bool(hello.get("torch_loaded"))  # in llama.cpp's process: should never be
        # llama.cpp's extra weight buffers (AMX, CPU repack) as loaded, and why they are off when they are
        self.weight_repack = bool(hello["weight_repack"])
        self.repack_off: str | None = hello.get("repack_off")

    def n_vocab(self) -> int:
        return self._n_vocab

    def logits(self, tokens: list[int]) -> np.ndarray:
        """``[len(tokens), V]`` float32: every position's logits, from an empty context."""
        return self._call({"op": "logits", "tokens": [int(t) for t in tokens]}, f"evaluating {len(tokens)} tokens")

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Each text as llama.cpp's own tokenizer encodes it (special tokens as the GGUF metadata says)."""
        return self._call({"op": "tokenize", "texts": list(texts)}, f"tokenizing {len(texts)} texts")["ids"]

    def greedy(self, prompt: list[int], n_new: int) -> tuple[list[int], float]:
        """``n_new`` greedy tokens through llama.cpp's KV cache, and the seconds it took (prompt included)."""
        reply = self._call({"op": "greedy", "prompt": [int(t) for t in prompt], "n_new": int(n_new)},
                           f"decoding {n_new} tokens")
        return reply["tokens"], float(reply["seconds"])

    def close(self) -> None:
        proc = self._proc
        if proc.poll() is None:
            try:
                proc.stdin.write(b'{"op": "close"}\n')
                proc.stdin.flush()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout, self._stderr):
            stream.close()

    def kill(self) -> None:
        """End llama.cpp's process now (no close request: it may be busy for seconds) and free its pipes."""
        end_child(self._proc, grace=0)
        for stream in (self._proc.stdin, self._proc.stdout, self._stderr):
            stream.close()

    def __enter__(self) -> LlamaCppProcess:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leaving on an error, Ctrl-C or SIGTERM: no waiting for a reply that no one reads
            self.kill()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()

    def _call(self, request: dict, what: str):
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(json.dumps(request).encode() + b"\n")
                self._proc.stdin.flush()
            except BrokenPipeError:
                pass  # the process is gone: _reply says how it ended
        reply = self._reply(what)
        if not reply.get("ok"):
            raise LlamaCppCrashed(f"llama.cpp failed {what} with {self.path}: {reply.get('error')}")
        if "bytes" not in reply:
            return reply
        data = self._proc.stdout.read(reply["bytes"])
        if len(data) != reply["bytes"]:
            self._died(what)
        return np.frombuffer(data, dtype="<f4").reshape(reply["shape"])

    def _reply(self, what: str) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            self._died(what)
        try:
            return json.loads(line)
        except json.JSONDecodeError:  # not our protocol: ggml's abort handler prints a gdb backtrace to stdout
            end_child(self._proc, grace=5)
            self._died(what)

    def _died(self, what: str):
        rc = self._proc.wait()
        self._stderr.seek(0)
        err = self._stderr.read().decode("utf-8", "replace").strip().splitlines()[-8:]
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
        raise LlamaCppCrashed(f"llama.cpp's process ended ({how}) while {what} with {self.path}"
                              + (":\n" + "\n".join(err) if err else ""))


def load_llamacpp(path: Path, *, n_ctx: int = N_CTX, threads: int | None = None,
                  f32_cache: bool = True, vocab_only: bool = False) -> LlamaCppProcess:
    """The GGUF file in llama.cpp, every position's logits kept; ``ValueError`` when llama.cpp cannot load it.

    ``vocab_only``: load the tokenizer only (:meth:`LlamaCppProcess.tokenize`), no weights.
    ``f32_cache``: keep the KV cache in float32 (llama.cpp's default is float16), so that an f32 file is
    measured as a file, not together with a half-precision cache.
    """
    # ggml's threads spin-wait for each other like torch's: on a machine busy with other work two threads
    # decoded SmolLM2 20x slower than one (1.1 vs 21.7 tokens/s), so leave out the cores the load takes.
    threads = threads or min(max(1, torch.get_num_threads()), pick_threads(0))
    return LlamaCppProcess(Path(path), n_ctx=n_ctx, threads=threads, f32_cache=f32_cache, vocab_only=vocab_only)


def llamacpp_runner(llm: LlamaCppProcess):
    """``(input_ids [B, L], attention_mask [B, L]) -> logits [B, L, V]``; padded positions are zeros
    (only positions with mask 1 are compared)."""
    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*input_ids.shape, llm.n_vocab(), dtype=torch.float32)
        for b in range(input_ids.shape[0]):
            n = int(attention_mask[b].bool().sum())
            if n:
                tokens = input_ids[b][:n].tolist()  # right padding: the real tokens come first
                out[b, :n] = torch.from_numpy(llm.logits(tokens).copy())
        return out

    return run


@dataclass(frozen=True)
class Decoded:
    tokens: list[list[int]]
    seconds: float  # prompt evaluation and decoding
    new_tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def greedy_decode(llm: LlamaCppProcess, prompts, n_new: int) -> Decoded:
    """Greedy continuation of each prompt (a ``[P, L]`` tensor or token lists), one token at a time through
    llama.cpp's KV cache; ``seconds`` counts the prompt's evaluation too, as transformers' ``generate`` does
    (timed inside llama.cpp's process: the pipe to it is not counted)."""
    rows, seconds = [], 0.0
    for prompt in (prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(p) for p in prompts]):
        got, s = llm.greedy(prompt, n_new)
        rows.append(got)
        seconds += s
    return Decoded(rows, seconds, len(rows) * n_new)


def llama_cpp_python_version() -> str:
    """The installed llama-cpp-python's version, read from its metadata (importing it here would load
    llama.cpp into this process, which :class:`LlamaCppProcess` exists to avoid)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return "not installed"
