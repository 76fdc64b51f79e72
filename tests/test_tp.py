"""tp/ against the reference: real gloo processes on 127.0.0.1, launched with torchrun as a user launches them.

Tolerances. Tensor parallelism splits each output projection's sum over its inputs into two partial sums added
by an all-reduce; data parallelism adds per-rank sums of losses in float64 and runs other micro-batches (other
padding). Either changes a float32 loss by a few ulps, and the tensors those losses move differ by as little
again, so: losses within 16 ulps (|L| < 1: 9.5e-7; measured up to 4.5 ulps); projected_grad = (L+ − L−)/2ε
within 2·9.5e-7/2ε (a wrong noise slice changes it by O(1)); tensors within lr·Σ_steps|Δg|·max|z| (< 6) plus a few
float32 roundings of θ. Run as a script (under torchrun), this file is the worker of the noise test.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer, records, z_of
from safetensors import safe_open
from safetensors.torch import load_file

import mezo
from mezo import checkpoints, models

ROOT = Path(__file__).resolve().parents[1]
ULPS = 16 * 2.0 ** -24  # 16 float32 ulps of a number below 1 (measured: up to 4.5)
EPS, LR = 1e-3, 1e-2


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(ROOT), "MEZO_FAST": "triton"}  # --fast: the kernels


def torchrun(nproc, *argv, **kw):
    """python -m torch.distributed.run on one host; a free port each time (--standalone)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *map(str, argv)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def cli_args(model, out, **kw):
    args = dict(task="synthetic", model=model, template="{sentence} It was {mask}", label_words=" bad, good", k=8,
                batch_size=8, micro_batch=4, steps=3, eval_every=3, eval_max=0, lr=LR, eps=EPS, threads=1, device="cpu",
                out=out)
    args.update(kw)
    return [str(x) for k, v in args.items() for x in (f"--{k.replace('_', '-')}", v)]


def reference(model, out, **kw):
    """The same run in this process, through mezo.main: the reference every parallel run is compared with."""
    assert mezo.main(cli_args(model, out, **kw)) == 0


def assert_same_run(ref, par, steps, keep=lambda r: True):
    """log.jsonl records (those kept) pair up; losses, projected gradients and eval figures within the module's
    tolerances; the checkpoints' full tensors agree."""
    a, b = [r for r in records(ref) if keep(r)], [r for r in records(par) if keep(r)]
    assert [(r["step"], r.get("split")) for r in a] == [(r["step"], r.get("split")) for r in b]
    g_tol = 2 * ULPS / (2 * EPS)
    sum_g = 0.0
    for x, y in zip(a, b):
        where = f"step {x['step']} {x.get('split', 'train')}"
        for key in ("loss_plus", "loss_minus", "loss"):
            if key in x:
                assert abs(x[key] - y[key]) <= ULPS, (where, key, x[key], y[key])
        if "projected_grad" in x:
            assert x["seed"] == y["seed"], where
            assert abs(x["projected_grad"] - y["projected_grad"]) <= g_tol, (where, x, y)
            sum_g += abs(x["projected_grad"] - y["projected_grad"])
        if "accuracy" in x:  # argmax flips only on a tie within a few ulps: none in these runs
            assert x["accuracy"] == y["accuracy"], where
    assert sum(1 for r in a if "projected_grad" in r) == steps
    ta, tb = load_file(Path(ref) / checkpoints.CHECKPOINT), load_file(Path(par) / checkpoints.CHECKPOINT)
    assert ta.keys() == tb.keys()
    tol = LR * 6 * steps * g_tol + 8 * 2.0 ** -24 * max(t.abs().max().item() for t in ta.values())
    for k in ta:
        assert ta[k].shape == tb[k].shape, k
        err = (ta[k] - tb[k]).abs().max().item()
        # --rule's buffers sum g·z (|z| < 6) or its square over the steps: the projected gradients' bound, scaled
        bound = tol if not k.startswith("rule.") else 6 * steps * g_tol * max(1.0, ta[k].abs().max().item() ** 0.5)
        assert err <= bound, (k, err, bound)


def finish(proc, timeout=900):
    """A launch's output, once it exited 0. The timeout only catches a hang: the module's launch took 130 to 250 s
    here (2026-12-07, the machine's quiet and busy days), and 180 s timed out on CI's machine."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


# One tensor-parallel and one data-parallel run per model family; LoRA on one family, every parameter on the other,
# so both LoRA placements (on colwise and on rowwise bases), sharded biases, rowwise weights (dim-1 shards) and
# replicated norms and embeddings are all in some run.
LORA_TARGETS = {"llama": "q_proj,v_proj,o_proj,down_proj", "roberta": "query,value,dense"}  # colwise and rowwise
CASES = [("llama", "tp", "lora"), ("roberta", "tp", "full"), ("llama", "dp", "full"), ("roberta", "dp", "lora")]
EXTRA = {("llama", "dp", "full"): dict(batch_size=7)}  # ranks get 4 and 3 examples: the mean must weigh them
FAST_CASES = [("llama", "tp", "full"), ("roberta", "tp", "lora")]  # --fast on shards (rows of rowwise weights)
# 2 steps: the first's restore + update + next +εz' fused, the last's without a next seed. Triton's interpreter runs a
# program per row of a rowwise shard, about 0.1 s each: these runs were most of the module's time at 3 steps, and
# still 60% of the launch at 2 on models of 2 layers. So they run on one layer: half the rows.
FAST_STEPS = 2
RULE_CASES = [("llama", "tp", "full", "adam"), ("roberta", "tp", "lora", "momentum"), ("llama", "dp", "lora", "sign"),
              ("roberta", "tp", "full", "conservative")]  # --rule on shards: buffers per shard, gathered to save
SEED = 1234  # of the noise test


def one_layer(kind: str, root: Path) -> str:
    """The tiny model of `kind` with one layer, in root (--fast's cases)."""
    path = root / f"tiny-{kind}-1-layer"
    if not path.exists():
        make_model(kind, layers=1).save_pretrained(path)
        make_tokenizer(causal=kind == "llama").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def worker(model_dir, tmp_path_factory):
    """One launch of 2 gloo processes (torch and transformers start in a few seconds per process on 2 cores, so
    the parallel runs share one process group): each case is `mezo.main(argv)`, the command line's own entry,
    under torchrun's environment; then the resume test's first step; then the noise of every shard."""
    root = tmp_path_factory.mktemp("tp")
    models = {k: model_dir(k) for k in ("llama", "roberta")}
    runs = [cli_args(models[kind], root / f"{kind}-{how}-{mode}", mode=mode, lora_targets=LORA_TARGETS[kind],
                     **EXTRA.get((kind, how, mode), {})) + [f"--{how}", "2"] for kind, how, mode in CASES]
    runs += [cli_args(one_layer(kind, root), root / f"{kind}-{how}-{mode}-fast", mode=mode,
                      lora_targets=LORA_TARGETS[kind], steps=FAST_STEPS, eval_every=FAST_STEPS)
             + [f"--{how}", "2", "--fast"] for kind, how, mode in FAST_CASES]
    runs += [cli_args(models[kind], root / f"{kind}-{how}-{mode}-{rule}", mode=mode, lora_targets=LORA_TARGETS[kind],
                      weight_decay=0.1) + [f"--{how}", "2", "--rule", rule] for kind, how, mode, rule in RULE_CASES]
    runs.append(cli_args(models["llama"], root / "resume", steps=1, eval_every=0, mode="full") + ["--tp", "2"])
    log = finish(torchrun(2, "tests/test_tp.py", root, json.dumps(dict(runs=runs, models=models))))
    return root, models, log


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_k_steps_equal_one_process(worker, tmp_path, case):
    kind, how, mode = case
    root, models, log = worker
    assert log.count("step      3 | test accuracy") == len(CASES) + len(RULE_CASES)  # rank 0 prints
    assert log.count(f"step      {FAST_STEPS} | test accuracy") == len(FAST_CASES)
    reference(models[kind], tmp_path, mode=mode, lora_targets=LORA_TARGETS[kind], **EXTRA.get(case, {}))
    assert_same_run(tmp_path, root / "-".join(case), steps=3)
    if mode == "lora":
        assert (root / "-".join(case) / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("case", FAST_CASES, ids=["-".join(c) for c in FAST_CASES])
def test_fast_on_shards_equals_one_process(worker, tmp_path, case):
    """--fast under tensor parallelism: each rank's kernels make the noise of its shards (a rowwise weight's
    shard is one stretch of global indices per row), equal to the reference backend in one process."""
    kind, how, mode = case
    root, _, _ = worker
    reference(one_layer(kind, root), tmp_path, mode=mode, lora_targets=LORA_TARGETS[kind], steps=FAST_STEPS,
              eval_every=FAST_STEPS)
    assert_same_run(tmp_path, root / ("-".join(case) + "-fast"), steps=FAST_STEPS)


@pytest.mark.parametrize("case", RULE_CASES, ids=["-".join(c) for c in RULE_CASES])
def test_each_rule_on_shards_equals_one_process(worker, tmp_path, case):
    """--rule over 2 processes: each rank's buffers are its shards' (tp) or whole (dp), the checkpoint gathers them;
    the run, its tensors and its buffers equal the rule in one process."""
    kind, how, mode, rule = case
    root, models, _ = worker
    reference(models[kind], tmp_path, mode=mode, lora_targets=LORA_TARGETS[kind], weight_decay=0.1, rule=rule)
    assert_same_run(tmp_path, root / "-".join(case), steps=3)
    saved = load_file(root / "-".join(case) / checkpoints.CHECKPOINT)
    assert any(k.startswith("rule.") for k in saved) == (rule in ("adam", "momentum"))


def test_resume_at_another_world_size(worker, tmp_path, capsys):
    """1 step at TP = 2 (equal to the reference's one step, tensors included), then 2 more in one process,
    equal to 3 steps in one process: the checkpoint holds full tensors."""
    root, models, _ = worker
    par, ref1, ref3 = root / "resume", tmp_path / "ref1", tmp_path / "ref3"
    reference(models["llama"], ref1, steps=1, eval_every=0, mode="full")
    assert_same_run(ref1, par, steps=1)
    assert mezo.main(["--resume", str(par), "--steps", "3"]) == 0  # a plain process: tp/dp are not kept
    assert "resumed from" in capsys.readouterr().out
    reference(models["llama"], ref3, steps=3, eval_every=0, mode="full")
    assert_same_run(ref3, par, steps=3, keep=lambda r: "split" not in r or r["step"] == 3)  # par also has step 1's


def test_sharded_noise_reassembles_to_the_reference(worker):
    """Each rank wrote z of its shards; the shards, put back where shard_start says, tile the full tensor
    exactly once and give bit for bit the reference's z of the whole tensor. A replicated tensor's z is the
    whole reference z on every rank."""
    root, models, _ = worker
    dims_split, n_sharded = set(), {"lora": 0, "full": 0}
    for kind, path in models.items():
        for mode in ("lora", "full"):
            _, params = setup(kind, path, mode)
            shards = [torch.load(root / f"noise-{kind}-{mode}-{r}.pt") for r in range(2)]
            for p in params:
                full = z_of(p, SEED)
                got, covered = torch.full_like(full, float("nan")), torch.zeros(full.shape, dtype=torch.int)
                for rank in range(2):
                    start, z = shards[rank][p.name]
                    where = tuple(slice(s, s + n) for s, n in zip(start, z.shape))
                    got[where], covered[where] = z, covered[where] + 1
                    dims_split |= {d for d, (n, f) in enumerate(zip(z.shape, full.shape)) if n != f}
                replicated = shards[0][p.name][1].shape == full.shape
                assert (covered == (2 if replicated else 1)).all(), p.name
                assert torch.equal(got, full), p.name
                n_sharded[mode] += not replicated
    assert dims_split == {0, 1}  # colwise (rows) and rowwise (columns) shards both checked
    assert n_sharded["lora"] >= 8 and n_sharded["full"] >= 20, n_sharded


def setup(kind, path, mode):
    cfg = mezo.Config(model=path, mode=mode, lora_targets=tuple(LORA_TARGETS[kind].split(",")))
    model, *_ = models.load_model(cfg.model, cfg.dtype, cfg.head)
    return model, mezo.select_trainables(model, cfg)


def test_bad_combinations_give_one_error_line(worker, model_dir, tmp_path, capsys, monkeypatch):
    root, _, log = worker
    # one line from the 2 ranks, not one each: the mistake is the same on every rank (local rank 0 says it)
    assert log.count("mezo: error: --tp 2 x --dp 2 = 4 processes, but torchrun started 2") == 1
    assert log.count("mezo: error: --tp 3 does not divide the 2 processes torchrun started; make --nproc-per-node a "
                     "multiple of 3") == 1  # (it had said "--tp 3 x --dp 0", a --dp the user never gave)
    assert log.count("mezo: error: a step's batch has 1 examples (--batch-size 1, 16 training examples), fewer than "
                     "--dp 2") == 1
    assert log.count("mezo: error:") == 3 and not (root / "dp-batch-1").exists()  # a refusal leaves no --out
    class FourRanks(mezo.Placement):  # the same check where the training set is what is short (no 4 processes here)
        dp = 4
    with pytest.raises(mezo.UsageError, match=r"batch has 2 examples \(--batch-size 8, 2 training examples\), fewer"):
        mezo.train(mezo.parse_args(cli_args(model_dir("llama"), tmp_path, k=1))[0], None, placement=FourRanks())
    assert mezo.main(cli_args(model_dir("llama"), tmp_path) + ["--tp", "2"]) == 2  # no torchrun
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "mezo: error: --tp 2 --dp 1 needs 2 processes: launch with torchrun --nproc-per-node 2 mezo.py ... (or, "
        "installed, -m mezo ...)")
    monkeypatch.setenv("LOCAL_RANK", "1")  # left in a shell without torchrun's WORLD_SIZE: the line is still said
    assert mezo.main(cli_args(model_dir("llama"), tmp_path) + ["--tp", "2"]) == 2
    assert "mezo: error: --tp 2 --dp 1 needs 2 processes" in capsys.readouterr().err
    from mezo.tp import check_tp
    with pytest.raises(mezo.UsageError, match="--tp 3 does not divide the model's 4 attention heads, 2 key/value"):
        check_tp(setup("llama", model_dir("llama"), "lora")[0], 3)


def test_killed_rank_ends_the_job(model_dir, tmp_path):
    """SIGKILL one worker mid-training: torchrun stops the other and exits non-zero, naming the dead rank."""
    proc = torchrun(2, "mezo.py", *cli_args(model_dir("llama"), tmp_path, steps=100000, eval_every=0), "--tp", 2)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 300  # the job's start: 2 processes loading torch
    while not (log.exists() and len(log.read_text().splitlines()) > 3):  # evals at step 0, then training steps
        assert time.time() < deadline and proc.poll() is None, "the job did not start training"
        time.sleep(0.2)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    rank1 = [int(p) for p in workers if "RANK=1" in Path(f"/proc/{p}/environ").read_bytes().decode().split("\0")]
    assert len(rank1) == 1
    t0 = time.time()
    os.kill(rank1[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and time.time() - t0 < 120
    assert "rank      : 1" in out and "SIGKILL" in out, out[-2000:]


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_checkpointed_step(model_dir, tmp_path):
    """SIGTERM to rank 1 alone of a --dp 2 job mid-training (as a scheduler may deliver it): the ranks agree on the
    step (Placement.any_rank), rank 0 checkpoints it, both exit 143 naming it, and the run resumes from there."""
    proc = torchrun(2, "mezo.py", *cli_args(model_dir("llama"), tmp_path, steps=100000, eval_every=0), "--dp", 2)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 300  # the job's start: 2 processes loading torch
    while not (log.exists() and '"step": 2,' in log.read_text()):
        assert time.time() < deadline and proc.poll() is None, "the job did not start training"
        time.sleep(0.2)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    rank1 = [int(p) for p in workers if "RANK=1" in Path(f"/proc/{p}/environ").read_bytes().decode().split("\0")]
    os.kill(rank1[0], signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    stopped = [int(m) for m in re.findall(r"mezo: error: stopped by .* after step (\d+), its checkpoint written", out)]
    assert proc.returncode != 0 and len(stopped) == 2 and stopped[0] == stopped[1], out[-3000:]
    assert "stopped by SIGTERM after step" in out and "stopped by another rank's signal after step" in out
    assert "exitcode  : 143" in out, out[-3000:]
    with safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as f:
        assert int(f.metadata()["step"]) == stopped[0] == records(tmp_path)[-1]["step"]
    assert mezo.main(["--resume", str(tmp_path), "--steps", str(stopped[0] + 2), "--dp", "1"]) == 0


if __name__ == "__main__":  # the worker: python -m torch.distributed.run ... tests/test_tp.py OUT SPEC
    import torch.distributed as dist
    from mezo.tp import DistributedPlacement

    torch.set_num_threads(1)
    out, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    for argv in spec["runs"]:
        assert mezo.main(argv) == 0, argv
    assert mezo.main(spec["runs"][0] + ["--tp", "2", "--dp", "2"]) == 2  # its error line goes to the log
    assert mezo.main(spec["runs"][0] + ["--tp", "3"]) == 2  # --dp left to the 2 processes
    # a DP run whose batch cannot be split, into a fresh --out (rank 0 would first refuse the one holding a run)
    assert mezo.main(spec["runs"][2] + ["--batch-size", "1", "--out", str(out / "dp-batch-1")]) == 2
    for kind, path in spec["models"].items():
        for mode in ("lora", "full"):
            model, params = setup(kind, path, mode)
            shards = DistributedPlacement(mezo.Config(model=path, tp=2, device="cpu")).shard(model, params)
            torch.save({p.name: (p.shard_start, z_of(p, SEED)) for p in shards},
                       out / f"noise-{kind}-{mode}-{os.environ['RANK']}.pt")
    dist.destroy_process_group()
