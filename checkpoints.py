"""Checkpoints and exports: the trainable tensors in one safetensors file (with the step and the
run's config, written atomically), and LoRA tensors in PEFT's adapter layout. Plain values in:
{name: tensor} and dicts."""
from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

import torch

from . import options
from .errors import UsageError

# format "mezo-1": tensors by qualified name; metadata step, config, offsets
FORMAT = "mezo-1"
CHECKPOINT = "checkpoint.safetensors"
# adapter/: PEFT's two files (save_peft_adapter)
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
# the config a run started with: a run killed before its first checkpoint resumes from its start
# and its log (runs.Run.resume)
RUN_CONFIG = "run.json"


def atomic_write(path: Path, write, then: str = "") -> None:
    """write(tmp_path), fsync, then rename over path: a reader never sees a half-written file. A
    write the machine refuses (a full disk, a read-only folder) removes its temporary file and ends
    in one line (then: what to do after the fix; default --resume the run): the file as it was
    stays whole."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a refused write, or Ctrl-C: no temporary file is left behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        # OSError, or safetensors' SafetensorError around one ("... (os error 28)")
        if isinstance(e, OSError) or (isinstance(e, Exception) and "os error" in str(e)):
            raise cannot_write(path, e, then) from None
        raise


def cannot_write(path: Path, e: Exception, then: str = "") -> UsageError:
    """The one line for a write the machine refused; what was written before is whole."""
    why = getattr(e, "strerror", None) or str(e).splitlines()[0]
    then = then or f"--resume {path.parent}"
    fix = {errno.EISDIR: "move that folder or pick another path for the file",
           errno.ENOENT: f"create {path.parent}"}.get(
        getattr(e, "errno", None), f"free some space or make {path.parent} writable")
    return UsageError(f"cannot write {path} ({why}); what was there is kept whole: {fix}, "
                      f"then {then}")


def own_storage(t: torch.Tensor) -> torch.Tensor:
    """t on the CPU, copied only if it views a larger buffer (fast/ keeps LoRA's tensors in one):
    safetensors refuses shared storage, and copying every tensor would cost full-parameter runs a
    copy of the model."""
    t = t.detach().cpu()
    whole = t.is_contiguous() and t.storage_offset() == 0 and \
        t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if whole else t.clone()


def save_checkpoint(out: Path, tensors: dict, step: int, config: dict, offsets: list,
                    data: dict | None = None) -> None:
    """out/checkpoint.safetensors: the tensors (full, never shards) and what a resume needs to go
    on (data: tasks.fingerprint of the run's splits)."""
    from safetensors.torch import save_file
    meta = dict(format=FORMAT, step=str(step), config=json.dumps(config),
                offsets=json.dumps(offsets), **({"data": json.dumps(data)} if data else {}))
    tensors = {name: own_storage(t) for name, t in tensors.items()}
    atomic_write(out / CHECKPOINT, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_checkpoint(folder: Path, flag: str = "--resume",
                    tensors: bool = True) -> tuple[dict, int, dict]:
    """(tensors, step, config dict) from a checkpoint (tensors=False: {}, only its header read);
    one clear error line, naming the flag that pointed at it (--resume or --replay), if it is
    missing or corrupt."""
    from safetensors import safe_open
    path = folder / CHECKPOINT
    if not path.is_file():
        what = (f"no {CHECKPOINT} there" if folder.is_dir() else "a file, not a folder"
                if folder.exists() else "no such folder")
        # a file or folder inside a run (its checkpoint, log.jsonl, adapter/): the run is above it
        run = folder.parent if (folder.parent / CHECKPOINT).is_file() else None
        raise UsageError(f"{flag} {folder}: {what}; point {flag} at "
                         + (f"the run's folder, {run}" if run else "a run's --out folder"))
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format", FORMAT) != FORMAT:  # (a checkpoint before "format" was mezo-1)
                raise UsageError(f"{flag} {folder}: {CHECKPOINT} is format {meta['format']!r}, "
                                 f"written by another version of mezo; this one reads {FORMAT!r}")
            read = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
        return read, int(meta["step"]), json.loads(meta["config"])
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"{flag} {folder}: {CHECKPOINT} is corrupt or not a mezo checkpoint "
                         f"({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def saved_data(folder: Path) -> dict:
    """The fingerprint of the data a checkpoint's run trained on ({} from a checkpoint that
    predates it)."""
    from safetensors import safe_open
    with safe_open(str(folder / CHECKPOINT), "pt") as f:
        try:
            data = json.loads((f.metadata() or {}).get("data", "{}"))
        except ValueError:  # (an edited header: nothing to check against)
            return {}
    return data if isinstance(data, dict) else {}


def check_match(folder: Path, tensors: dict, want: dict) -> None:
    """The checkpoint's tensors are exactly the model's trainable ones: want = {name: (full shape,
    dtype)}."""
    if set(want) != set(tensors):
        missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        raise UsageError(f"--resume {folder}: checkpoint does not match this model's trainable "
                         f"tensors (missing {missing[:3]}, unexpected {extra[:3]}); resume with "
                         "the run's own settings")
    for name, (shape, dtype) in want.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise UsageError(f"--resume {folder}: {name} is {tuple(t.shape)} {t.dtype} in the "
                             f"checkpoint but {tuple(shape)} {dtype} in the model")


def save_peft_adapter(folder: Path, lora: dict, r: int, alpha: float, base: str,
                      causal: bool) -> None:
    """LoRA tensors ({module.lora_A|lora_B: tensor}) in PEFT's layout, so that
    `PeftModel.from_pretrained(model, folder)` (or AutoPeftModelForCausalLM.from_pretrained(folder),
    which loads `base` itself) takes them."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"base_model.model.{name}.weight": t.detach().cpu().clone()
               for name, t in lora.items()}
    modules = sorted({name.rsplit(".", 1)[0] for name in lora})
    adapter = dict(peft_type="LORA", r=r, lora_alpha=alpha, target_modules=modules,
                   lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                   base_model_name_or_path=base, task_type="CAUSAL_LM" if causal else None,
                   inference_mode=True)
    atomic_write(folder / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write(folder / ADAPTER_CONFIG,
                 lambda tmp: tmp.write_text(json.dumps(adapter, indent=2)))


def saved_config(folder: Path, flag: str = "--resume", known=None) -> dict:
    """A checkpoint's config for --resume and --replay: lists back to tuples, no world size (tp, dp:
    a checkpoint holds full tensors and resumes at any), no replay (a replayed run's folder resumes
    as a run) and no overwrite (an order to one command, not a setting of the run). A run with no
    checkpoint yet: the config it started with."""
    path = folder / RUN_CONFIG
    if (folder / CHECKPOINT).is_file() or not path.is_file():
        _, _, config = read_checkpoint(folder, flag, tensors=False)  # (its header alone)
        path = folder / CHECKPOINT
    else:
        try:
            config = json.loads(path.read_text())
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
            # what every run.json has held: without one, the defaults would make another run
            lacks = [k for k in ("task", "model", "mode", "seed", "data_seed", "lr", "eps", "steps")
                     if k not in config]
            if lacks:
                raise ValueError(f"it lacks {', '.join(lacks)}")
        except ValueError as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            raise UsageError(f"{flag} {folder}: {RUN_CONFIG} is damaged ({e}); --overwrite "
                             "with the run's flags starts it again") from None
    dropped = ("tp", "dp", "replay", "overwrite")
    unknown = sorted(set(config) - set(known)) if known is not None else []
    if unknown:  # a later version's setting: going on without it is another run
        raise UsageError(f"{flag} {folder}: its run has settings this version of mezo does not "
                         f"know ({', '.join(unknown)}); go on with the version that wrote it")
    for key, value in config.items():  # as the run's own, not as a flag the user gave now
        if known is not None and key not in dropped:
            try:
                options.check_field(known[key], value, key)
            except UsageError as e:
                raise UsageError(f"{flag} {folder}: {path.name} is damaged ({e}); --overwrite "
                                 "with the run's flags starts it again") from None
    return {k: tuple(v) if isinstance(v, list) else v
            for k, v in config.items() if k not in dropped}
