"""Assertions shared by several test modules: no hook left behind, the model unchanged."""

from __future__ import annotations

import torch
from torch import nn


def hooks_left(model: nn.Module) -> list[str]:
    """Names of modules that hold any forward, pre-forward or backward hook."""
    held = []
    for name, module in model.named_modules():
        for attribute in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                          "_backward_pre_hooks", "_forward_hooks_with_kwargs"):
            if getattr(module, attribute, None):
                held.append(f"{name or '<root>'}.{attribute}")
    return held


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "inplace": [getattr(m, "inplace", None) for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert hooks_left(model) == []
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key  # bit-identical
    for key in ("training", "inplace", "requires_grad"):
        assert after[key] == before[key], key


def distributed_scan_worker(rank: int, world: int, store: str, out: str, data: str,
                            layers: list[str]) -> None:
    """One rank of a torch.distributed scan (gloo, file store); rank 0 saves the result."""
    import torch.distributed as dist

    import vizcnn

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        top = vizcnn.scan_topk(vizcnn.load_model("demo"), data, layers, batch_size=16,
                               progress=False)
        if rank == 0:
            top.save(out)
    finally:
        dist.destroy_process_group()
