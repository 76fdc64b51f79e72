"""Shared fixtures and helpers: tiny real transformers models (built from configs, random
weights, fixed seed) with a real word-level tokenizer, saved to disk so the CLI loads them
exactly as it loads a pretrained folder; the command line as the tests run it (run, records,
tiny_args, expect_error); tensor-parallel shards (shards_st, shard_pair). Test modules import
them as `from conftest import ...`."""
import dataclasses
import json
import os
import re
import subprocess

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (transformers does)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mezo.tasks import prompts, synthetic  # noqa: E402

import mezo  # noqa: E402
from mezo import (
    models,  # noqa: E402
    tasks,  # noqa: E402
)

# the cores shared among pytest-xdist's workers (make test runs 2): two processes each running torch on every core
# slow each other down badly
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))))

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True)
settings.register_profile("long", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
WORDS = sorted({w for ws in synthetic.WORDS.values() for w in ws} | set(synthetic.NOUNS)
               | set("the a i was is and long thought what it review overall movie . , : ! ?".split())
               | set("not very funny film bad good story".split()))
# The "+tasks" models add every task's label words and prompt words (tasks/__init__.py), so each task runs with its
# own prompt; the plain ones keep the vocabulary (and so the random weights) that the other tests were sized on.
TASK_WORDS = sorted(set("okay subjective objective description entity expression human location number yes no maybe"
                        " this does mean that true or question type of answer \"".split()) - set(WORDS))


def make_tokenizer(causal: bool, tasks_vocab: bool = False):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + (TASK_WORDS if tasks_vocab else []))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = "<s> $A" if causal else "<s> $A </s>"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>")


def make_model(kind: str, dtype=torch.float32, seed: int = 0, layers: int = 2):
    """A tiny model: kind "llama" or "roberta", with "+tasks" for the larger vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(seed)
    n = len(SPECIALS) + len(WORDS) + (len(TASK_WORDS) if kind.endswith("+tasks") else 0)
    kind = kind.removesuffix("+tasks")
    if kind == "roberta":
        cfg = RobertaConfig(vocab_size=n, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=140, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        model = RobertaForMaskedLM(cfg)
    else:
        cfg = LlamaConfig(vocab_size=n, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """kind -> folder with config.json, weights and tokenizer (saved once per session)."""
    made = {}

    def get(kind: str) -> str:
        if kind not in made:
            path = tmp_path_factory.mktemp(f"tiny-{kind.replace('+', '-')}")
            make_model(kind).save_pretrained(path)
            make_tokenizer(causal=kind.startswith("llama"), tasks_vocab=kind.endswith("+tasks")).save_pretrained(path)
            made[kind] = str(path)
        return made[kind]
    return get


def load_tiny(model_dir, kind: str, **overrides):
    """(cfg, model, tokenizer, params, forward) for a tiny model, set up exactly as mezo.train sets it up."""
    return set_up(model_dir(kind), **overrides)


def set_up(folder: str, cast=None, make_forward=None, **overrides):
    """(cfg, model, tokenizer, params, forward) for the model in `folder`, set up exactly as mezo.train sets it
    up (overrides: Config's fields, --dtype included); cast to the torch dtype `cast` after loading if one is
    given; `make_forward(model, label_ids, params)` (default mezo.PromptForward)."""
    cfg = mezo.Config(model=folder, **overrides)
    model, tok, _, _ = models.load_model(cfg.model, cfg.dtype, cfg.head)
    if cast is not None:
        model.to(cast)
    template, words = tasks.prompt(cfg.task, "mlm" if models.model_kind(model) == "mlm" else "causal")
    cfg = dataclasses.replace(cfg, template=cfg.template or template, label_words=cfg.label_words or words)
    if cfg.head == "cls":
        models.add_cls_head(model, len(cfg.label_words), cfg.seed)
    label_ids = prompts.label_token_ids(tok, cfg.label_words) if cfg.head == "prompt" else []
    params = mezo.select_trainables(model, cfg)
    return cfg, model, tok, params, (make_forward or mezo.PromptForward)(model, label_ids, params)


def z_of(p, seed: int) -> torch.Tensor:
    """The whole z of a trainable tensor or shard (tests only: the algorithm never materialises it)."""
    return mezo.noise(seed, p.global_index(0, p.tensor.numel())).view(p.tensor.shape)


# --- The command line, as the CLI tests run it


def run(argv, capsys):
    """mezo.main on argv, on the CPU unless argv names a device: the tests compare with CPU
    computations, and `--device auto` would pick CUDA on a machine that has it."""
    argv = [str(a) for a in argv]
    code = mezo.main(argv if "--device" in argv else argv + ["--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def records(folder):
    """The run's log.jsonl, one dict per line."""
    return [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]


def tiny_args(model_dir, out, **kw):
    """Arguments of a short synthetic run of the tiny llama; kw overrides any of them."""
    args = dict(task="synthetic", model=model_dir("llama"), template="{sentence} It was {mask}",
                label_words=" bad, good", k=8, batch_size=8, steps=6, eval_every=3, eval_max=0,
                lr=1e-2, out=out)
    args.update(kw)
    return [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", v)]


def expect_error(capsys, argv, pattern, code=2):
    """Run argv: it exits with `code` and prints one `mezo: error:` line, matching pattern."""
    got, out, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("mezo: error:")]
    assert got == code and len(lines) == 1, (got, err[-2000:])
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


# --- Tensor-parallel shards, as tp/ makes them (test_fast, test_compiled)

# a global offset near 0, or past 2^32 (the Philox counter's high word)
offset_st = st.one_of(st.integers(0, 7), st.integers(2**32 - 50, 2**40))


@st.composite
def shards_st(draw):
    """Tensor-parallel shards, as tp/ makes them: each a contiguous block of a full tensor cut
    along one dimension (a colwise weight's rows, a rowwise weight's columns, a bias's slice),
    with global offsets."""
    out, offset = [], draw(offset_st)
    for i in range(draw(st.integers(1, 3))):
        # Short leading dimensions and a long last one. A cut along a later dimension makes a stretch of the shard
        # per row before it (fast/kernels.py), and Triton's interpreter takes about 0.1 s a program, one per
        # stretch: at most 25 rows here. The long last dimension lets a shard span more than one of the kernels'
        # 4,096-element blocks, and a stretch more than one block.
        ndim = draw(st.integers(1, 3))
        full = (*draw(st.lists(st.integers(1, 5), min_size=ndim - 1, max_size=ndim - 1)),
                draw(st.integers(1, 10_000 if ndim == 1 else 1_500)))
        d = draw(st.integers(0, len(full) - 1))
        parts = draw(st.integers(1, 4))
        rank = draw(st.integers(0, parts - 1))
        size = -(-full[d] // parts)
        lo, hi = min(rank * size, full[d] - 1), min((rank + 1) * size, full[d])
        start = tuple(lo if k == d else 0 for k in range(len(full)))
        shape = tuple(hi - lo if k == d else n for k, n in enumerate(full))
        out.append((f"w{i}", shape, full, start, offset, len(full) >= 2))
        offset += draw(st.integers(0, 3)) + torch.Size(full).numel()
    return out


def shard_pair(specs, dtype, device):
    """The shards of `specs` (see shards_st) twice, with the same random values."""
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(shape, generator=g).to(dtype).to(device) for _, shape, *_ in specs]
    return [[mezo.Trainable(name, t.clone(), offset, decay, full, start)
             for t, (name, _, full, start, offset, decay) in zip(tensors, specs)] for _ in range(2)]


# --- In CI, a skip is allowed only where a GPU is missing

# A test that skips for any other reason (a missing package, an import that failed, as `importorskip("fast")`
# did once after a rename and hid 35 tests) did not run: CI fails instead of reporting it as a pass.
GPU_SKIPS = ("no CUDA GPU", "this machine has a CUDA GPU")  # the second: a test of a machine without one


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI") != "true" or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    other = [r for r in skipped if not any(reason in str(r.longrepr) for reason in GPU_SKIPS)]
    if other:
        reporter.write_line(f"CI: {len(other)} skipped for another reason than a missing GPU:")
        for r in other:
            reporter.write_line(f"  {r.nodeid}: {r.longrepr}")
        session.exitstatus = 1


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (root, Linux), unmounted afterwards; else the test is skipped."""
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def fill_disk(where: Path) -> Path:
    """A file that takes the rest of where's disk (a tmpfs); unlink it to free the space."""
    filler = where / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler
