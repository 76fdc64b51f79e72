"""tp/: tensor-parallel and data-parallel MeZO on torch.distributed (the placement seam of mezo.py).

    torchrun --nproc-per-node 2 mezo.py --task sst2 --tp 2         # tensor parallel
    torchrun --nproc-per-node 2 mezo.py --task sst2 --dp 2         # data parallel
    torchrun --nproc-per-node 4 mezo.py --task sst2 --tp 2 --dp 2  # both: a 2-D (dp, tp) mesh

How this differs from the reference: not in the algorithm. `mezo.train` runs unchanged on every rank
and asks this placement four things:

- shard(model, params): the attention and MLP linears of each transformer block are split with
torch's DTensor API (ColwiseParallel for q/k/v and up/gate, RowwiseParallel for the output
projections), Megatron style: one all-reduce of the hidden state after attention and one after the
MLP. LoRA tensors follow their base layer so that its forward needs no extra communication: a
colwise base (output split) splits lora_B by rows and replicates lora_A; a rowwise base (input
split) splits lora_A by columns and replicates lora_B (x_shard @ A_shard.T is a partial sum, reduced
by the base layer's own all-reduce). Embeddings, norms and the LM head stay replicated. Each
Trainable keeps its name, offset and full shape from the unsharded model and learns where its shard
starts, so it generates exactly its slice of the global z (mezo.Trainable.global_index); replicated
tensors use the same indices, hence the same z, on every rank. No noise is broadcast and no weights
are communicated: every rank applies the same update.
- local(examples): data-parallel rank d takes examples d, d + dp, d + 2dp, ... of the step's batch.
- mean(value, n): one all-reduce of (n·value, n) over the data-parallel group, so the result is the
mean over the whole batch, weighted by example count exactly as one process would take it.
- gather(params): full tensors for checkpoints (DTensor.full_tensor), written by rank 0 alone; a
checkpoint therefore resumes at any world size, one process included.

A rank that dies ends the job through torchrun (it stops the other workers); a rank that hangs makes
the others' next collective fail after --dist-timeout seconds (the process group's timeout), which
ends the job.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import mezo

from ..models import layer_index

# Linear layers inside a transformer block, by the end of their qualified name: Llama/SmolLM2, then
# RoBERTa/BERT.
COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
           "attention.self.query", "attention.self.key", "attention.self.value",
           "intermediate.dense")
ROWWISE = ("o_proj", "down_proj", "attention.output.dense", "output.dense")


def tp_plan(model: nn.Module) -> dict[str, str]:
    """{qualified name: "colwise" | "rowwise"} for the linear layers of every transformer block."""
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and layer_index(name) is not None:
            if name.endswith(COLWISE):
                plan[name] = "colwise"
            elif name.endswith(ROWWISE):
                plan[name] = "rowwise"
    return plan


def check_tp(model: nn.Module, tp: int) -> None:
    """Heads (query and key/value) and the MLP width must split evenly: a rank holds whole heads."""
    c = model.config
    sizes = {"attention heads": c.num_attention_heads,
             "key/value heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
             "MLP width": c.intermediate_size}
    bad = [f"{v} {k}" for k, v in sizes.items() if v % tp]
    if bad:
        raise mezo.UsageError(f"--tp {tp} does not divide the model's {', '.join(bad)}; pick a "
                              "--tp that divides "
                              f"{', '.join(f'{v} {k}' for k, v in sizes.items())}")
    if not tp_plan(model):
        raise mezo.UsageError(f"--tp {tp}: found no attention/MLP linear layers to split in "
                              f"{type(model).__name__} (tp/ knows Llama-style and RoBERTa/BERT "
                              "blocks); run with --tp 1")


# Where a LoRA pair lives, given its base layer's split (see the module docstring).
LORA_PLACEMENTS = {"colwise": dict(lora_A=Replicate(), lora_B=Shard(0)),
                   "rowwise": dict(lora_A=Shard(1), lora_B=Replicate())}


def shard_model(model: nn.Module, params: list[mezo.Trainable], mesh) -> list[mezo.Trainable]:
    """Split the model over a 1-D tensor-parallel mesh in place; return the trainables as this
    rank's shards."""
    plan = tp_plan(model)
    lora = {}  # set aside, or ColwiseParallel would split lora_A along its rank dimension too
    for name in plan:
        layer = model.get_submodule(name)
        if "lora_A" in layer._parameters:
            lora[name] = {k: layer._parameters.pop(k) for k in ("lora_A", "lora_B")}
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    layouts = {}
    for name, kind in plan.items():
        style = styles[kind]()
        # every rank built the same full weights: each keeps its slice, nothing is sent
        style.src_data_rank = None
        layouts[name] = style
    parallelize_module(model, mesh, layouts)
    for name, pair in lora.items():
        layer = model.get_submodule(name)
        for key, param in pair.items():
            placement = LORA_PLACEMENTS[plan[name]][key]
            shard = distribute_tensor(param.data, mesh, [placement], src_data_rank=None)
            layer.register_parameter(key, nn.Parameter(shard, requires_grad=param.requires_grad))
    # The LoRA forward hook was registered before parallelize_module's own hooks, so it runs on
    # DTensors (input and output still distributed): x @ A.T @ B.T takes the placements above with
    # no communication.

    rank, out = mesh.get_local_rank(), []
    for p in params:
        t = model.get_parameter(p.name)
        if not isinstance(t, DTensor):
            out.append(dataclasses.replace(p, tensor=t))
            continue
        local = t.to_local()
        # updates in place
        assert local.data_ptr() == t._local_tensor.data_ptr() and local.is_contiguous(), p.name
        start = [0] * t.dim()
        for placement in t.placements:
            if placement.is_shard():
                start[placement.dim] = rank * (t.shape[placement.dim] // mesh.size())
        out.append(dataclasses.replace(p, tensor=local, shard_start=tuple(start)))
    return out


class DistributedPlacement(mezo.Placement):
    """One rank of a (dp, tp) mesh. Made by mezo.variants when --tp/--dp ask for it or under
    torchrun."""

    def __init__(self, cfg: mezo.Config):
        # a CPU rank's device: --device's (cpu); a GPU rank's: its LOCAL_RANK's, below
        super().__init__()
        if "WORLD_SIZE" not in os.environ:
            n = cfg.tp * max(cfg.dp, 1)
            raise mezo.UsageError(f"--tp {cfg.tp} --dp {max(cfg.dp, 1)} needs {n} processes: "
                                  f"launch with torchrun --nproc-per-node {n} mezo.py ... (or, "
                                  "installed, -m mezo ...)")
        world, rank = mezo.runs.world_size(), int(os.environ["RANK"])
        self.tp, self.dp = cfg.tp, cfg.dp or world // cfg.tp
        if not cfg.dp and world % cfg.tp:  # (--dp left to torchrun's process count)
            raise mezo.UsageError(f"--tp {cfg.tp} does not divide the {world} processes torchrun "
                                  f"started; make --nproc-per-node a multiple of {cfg.tp}")
        if self.tp * self.dp != world:
            raise mezo.UsageError(f"--tp {self.tp} x --dp {self.dp} = {self.tp * self.dp} "
                                  f"processes, but torchrun started {world}; make --nproc-per-node "
                                  "equal to tp x dp")
        use_cuda = torch.cuda.is_available() and not cfg.device.startswith("cpu")
        if use_cuda:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        # a caller (a test worker) may run several trainings in one
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if use_cuda else "gloo",
                                    timeout=datetime.timedelta(seconds=cfg.dist_timeout))
        mesh = init_device_mesh("cuda" if use_cuda else "cpu", (self.dp, self.tp),
                                mesh_dim_names=("dp", "tp"))
        self.tp_mesh, self.dp_mesh = mesh["tp"], mesh["dp"]
        self.dp_rank = self.dp_mesh.get_local_rank()
        self.is_main = rank == 0
        self.comm_device = self.device or torch.device("cpu")
        if not self.is_main:
            # rank 0 alone prints; errors still reach stderr from every rank
            sys.stdout = open(os.devnull, "w")

    def shard(self, model: nn.Module, params: list[mezo.Trainable]) -> list[mezo.Trainable]:
        if self.tp == 1:
            return params
        check_tp(model, self.tp)
        return shard_model(model, params, self.tp_mesh)

    def local(self, examples: list[dict]) -> list[dict]:
        return examples[self.dp_rank::self.dp]

    def mean(self, value: float, n: int) -> float:
        if self.dp == 1:
            return value  # tensor-parallel ranks already share one loss
        t = torch.tensor([value * n if n else 0.0, float(n)], dtype=torch.float64,
                         device=self.comm_device)
        dist.all_reduce(t, group=self.dp_mesh.get_group())  # (Σ n_d·L_d, Σ n_d): two scalars
        return (t[0] / t[1]).item()

    def gather(self, params: list[mezo.Trainable]) -> list[mezo.Trainable]:
        if self.tp == 1:
            return params
        return [p if p.tensor.shape == p.full_shape else
                dataclasses.replace(p, tensor=_full(p, self.tp_mesh),
                                    shard_start=(0,) * len(p.full_shape))
                for p in params]

    def any_rank(self, flag: bool) -> bool:
        """Whether any rank holds flag (a signal asked it to stop): one scalar's all-reduce a step,
        so that every rank stops after the same step."""
        t = torch.tensor([float(flag)], device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def peer_failure(self, error: BaseException) -> str | None:
        return peer_failure(error)

    def close(self) -> None:
        # no rank leaves while another still needs it (e.g. rank 0 writing the checkpoint)
        dist.barrier()
        if self.owns_group:
            dist.destroy_process_group()


# What gloo and nccl say when the peer of a collective is gone or silent.
PEER_LOST = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer",
             "Broken pipe", "Watchdog caught collective operation timeout",
             "NCCL communicator was aborted")


def peer_failure(e: BaseException) -> str | None:
    """One line for a collective that failed because another rank died or hung (None for any other
    error)."""
    text = str(e)
    if not any(s in text for s in PEER_LOST):
        return None
    detail = next(line for line in text.splitlines()
                  if any(s in line for s in PEER_LOST)).split("] ")[-1]
    return (f"rank {os.environ.get('RANK', '?')}: a collective failed ({detail.strip()}): "
            "another rank died, or hung past --dist-timeout; the job stops")


def _full(p: mezo.Trainable, mesh) -> torch.Tensor:
    """The full tensor from every rank's shard (an all-gather along the split dimension)."""
    dims = [d for d, (n, f) in enumerate(zip(p.tensor.shape, p.full_shape)) if n != f]
    shard = DTensor.from_local(p.tensor.detach(), mesh, [Shard(dims[0])], run_check=False)
    return shard.full_tensor()
