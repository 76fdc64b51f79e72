"""Command-line options from a config dataclass: each field made by `option()` carries its --help
text, its choices and its range; `check` enforces them in one error line each, `parser` builds
argparse from them."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import numbers
import re

import torch

from .errors import UsageError, says_mistakes


def finite(v) -> bool:
    """A rate the optimizer takes (lr, eps, weight decay): a real number or a one-element tensor,
    neither infinite nor NaN."""
    return (isinstance(v, (numbers.Real, torch.Tensor)) and torch.as_tensor(v).numel() == 1
            and math.isfinite(v))


def option(default, help: str, choices=None, min=None, above=None, below=None, parse=None):
    """A config field: its default, what --help says of it, its allowed values, its bounds
    (>= min or > above, and < below), and how the command line reads it (parse: e.g. a spelling to
    its canonical name)."""
    meta = dict(help=help, choices=choices, min=min, above=above, below=below, parse=parse)
    return dataclasses.field(default=default, metadata=meta)


# what a field's annotation asks of a value given in Python (the command line's are parsed)
KINDS = {"bool": (bool, "True or False"), "int": (numbers.Integral, "a whole number"),
         "float": (numbers.Real, "a number"), "str": (str, "text"),
         "tuple": ((tuple, list), "a tuple of text, one item each")}


def typed(f, value, flag: str):
    """value as f's annotation has it (an int for a float field becomes a float, a list a tuple),
    or one UsageError: Config(steps=2.5) or Config(lr="1e-3") had failed deep in a run."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None and "None" in kind:
        return value
    want, said = KINDS.get(kind.split("[")[0].split("|")[0].strip(), (object, ""))
    ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    if ok and want == (tuple, list):
        ok = all(isinstance(v, str) for v in value)
    if not ok:
        raise UsageError(f"{flag} takes {said}, got {value!r}")
    made = {numbers.Integral: int, numbers.Real: float, (tuple, list): tuple}.get(want)
    return made(value) if made else value


def check(cfg) -> None:
    """Every field of its type, among its choices and within its bound, or one UsageError naming
    the flag. A field with a spelling to parse takes it (Config(task="SST-2") as --task SST-2)."""
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, check_field(f, getattr(cfg, f.name), "--" + f.name.replace("_", "-")))


def check_field(f, value, flag: str):
    """value as field f takes it (typed, and parsed where f has a spelling), or one UsageError
    that names it as `flag`: its type, choices and bounds (check's, one field; a run.json's too)."""
    meta = f.metadata
    value = typed(f, value, flag)
    if meta.get("parse") and isinstance(value, str):
        value = meta["parse"](value)
    if meta.get("choices") and value not in meta["choices"]:
        names = ", ".join(str(c) for c in meta["choices"] if c is not None)
        raise UsageError(f"unknown {flag} {value!r}; choose one of {names}")
    bound, strict = meta.get("min"), False
    if meta.get("above") is not None:
        bound, strict = meta["above"], True
    if isinstance(value, bool):
        return value
    if isinstance(value, tuple) and not value:  # --label-words "$UNSET": not the default
        raise UsageError(f"{flag} is empty; give comma-separated values, or leave {flag} out "
                         "for the default")
    if isinstance(value, tuple) and "" in value:  # "a,,b": a slip, not an empty word
        raise UsageError(f"{flag} {','.join(map(str, value))!r} has an empty item; give "
                         "comma-separated values with none empty")
    if isinstance(value, str) and not value.strip():  # Config(out=""): not "no folder"
        raise UsageError(f"{flag} is empty; give a value, or leave {flag} out for the default")
    if bound is not None and isinstance(value, int) and value < bound:
        raise UsageError(f"{flag} {value} is out of range: it must be >= {bound}")
    if bound is not None and isinstance(value, float) and not (
            math.isfinite(value) and (value > bound if strict else value >= bound)):
        sign = ">" if strict else ">="
        raise UsageError(f"{flag} must be a finite number {sign} {bound}, got {value}")
    below = meta.get("below")
    if below is not None and not value < below:  # a seed the generators cannot take, β ≥ 1
        power = isinstance(below, int) and below > 1 << 16 and below & (below - 1) == 0
        raise UsageError(f"{flag} {value} is out of range: it must be < "
                         f"{f'2^{below.bit_length() - 1}' if power else below}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, with a mistaken flag told in one line: the whole usage is --help's."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        # a value like -1e-3 is a number, as -5 and -0.5 are to argparse, not a flag (it was
        # "--lr: expected one argument"; now the flag's own range check says what is wrong)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.I)

    def error(self, message: str):
        flags = [w.split("=")[0] for w in message.split() if w.startswith("--")]
        near = [m for w in flags if message.startswith("unrecognized")
                for m in difflib.get_close_matches(w, list(self._option_string_actions), 1)]
        hint = f"did you mean {' '.join(near)}? " if near else ""
        self.exit(2, f"{self.prog}: error: {message} ({hint}--help lists every flag)\n")

    def exit(self, status=0, message=None):
        # a mistaken flag is every rank's under torchrun: said once a machine, as UsageError is
        super().exit(status, message if status == 0 or says_mistakes() else None)

    def parse_known_args(self, args=None, namespace=None):
        """argparse's, and a text flag given empty (`--out "$UNSET"`) is refused: it is not the
        flag left out (a run without --out would keep nothing). A subcommand's parser checks its
        own."""
        parsed, extra = super().parse_known_args(args, namespace)
        for a in self._actions:
            value = getattr(parsed, a.dest, None)
            if isinstance(value, str) and not value.strip() and value != a.default:
                unset = ", or leave it out for its default" if a.option_strings else ""
                self.exit(2, f"{self.prog}: error: {(a.option_strings or [a.dest])[-1]} is empty; "
                             f"give a value{unset}\n")
        return parsed, extra


def whole(text: str) -> int:
    """An integer flag's value: 1e5 is 100000, as step counts are written (the paper's 100K steps);
    2.5 is refused."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value.is_integer()):
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}, not a whole number")
    return int(value)


def count(low: int = 1):
    """argparse type of a script's count (results.py's --jobs, a benchmark's --steps): a whole
    number of `low` or more (1e6 reads as 1000000), else one line that says so."""
    def parse(text: str) -> int:
        try:
            n = whole(text)
        except argparse.ArgumentTypeError:
            n = None
        if n is None or n < low:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of {low} or more")
        return n
    return parse


def parser(config_class, prog: str, description: str) -> argparse.ArgumentParser:
    """--flag-name for every field (tuples comma-separated, booleans as switches); unset flags stay
    absent."""
    p = Parser(prog=prog, description=description)
    # "," is no words, for check_field's "is empty"; "a,,b" keeps its empty item for its refusal
    comma = lambda s: tuple(s.split(",")) if s.strip(",") else ()
    for f in dataclasses.fields(config_class):
        meta, default = f.metadata, f.default
        shown = default
        if isinstance(default, tuple):
            shown = ",".join(default)
        elif isinstance(default, str):
            shown = repr(default)
        text = f"{meta.get('help', '')} (default: {shown})".replace("%", "%%")
        kw = dict(default=argparse.SUPPRESS, help=text)
        if meta.get("choices"):
            kw["metavar"] = "{" + ",".join(str(c) for c in meta["choices"] if c is not None) + "}"
        kind = str(f.type)  # a string under `from __future__ import annotations`
        if kind == "bool":
            kw["action"] = "store_true"
        elif meta.get("parse"):
            kw["type"] = meta["parse"]
        else:
            scalar = {"int": whole, "float": float}.get(kind.split(" ")[0], str)
            kw["type"] = comma if "tuple" in kind else scalar
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    return p
