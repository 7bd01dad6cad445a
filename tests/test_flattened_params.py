"""FSDP1's flattened parameters are refused with a message naming FSDP2: per-tensor keys
on flat shards would silently be per-shard. Run in a child process (FSDP1's flat
parameter needs a process group: one rank, gloo, file rendezvous)."""
import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.distributed.fsdp._flat_param import FlatParamHandle, HandleShardingStrategy
    import cm_fused

    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0,
                            world_size=1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    originals = list(model.parameters())
    # FSDP1's own flattening (what FullyShardedDataParallel does per wrapped module; its
    # constructor needs an accelerator, the handle does not)
    handle = FlatParamHandle(originals, model, torch.device("cpu"),
                             HandleShardingStrategy.FULL_SHARD, False, None, None, None,
                             dist.group.WORLD, True)
    handle.shard()
    results = []
    for name, params in (("flat", [handle.flat_param]), ("orig", originals)):
        for cls in (cm_fused.AdamCM, cm_fused.SGDAM):
            try:
                cls(params, backend="reference")
                results.append(f"{name}-{cls.__name__}: accepted")
            except TypeError as e:
                results.append(f"{name}-{cls.__name__}: {e}")
    # flattened later, by a wrapper that edits the groups: refused at the step,
    # before anything changes
    plain = [torch.nn.Parameter(torch.ones(3))]
    opt = cm_fused.AdamCM(plain, backend="reference")
    opt.param_groups[0]["params"] = [handle.flat_param]
    handle.flat_param.grad = torch.ones_like(handle.flat_param)
    before = handle.flat_param.detach().clone()
    try:
        opt.step()
        results.append("step: accepted")
    except TypeError as e:
        changed = not torch.equal(before, handle.flat_param.detach()) or bool(opt.state)
        results.append(f"step: {e} changed={changed}")
    dist.destroy_process_group()
    print("\\n".join(results))
""")


def test_fsdp1_flat_parameters_are_refused_with_the_way_out(tmp_path):
    pytest.importorskip("torch.distributed.fsdp._flat_param")
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "rendezvous")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 5, out.stdout
    for line in lines:
        assert "accepted" not in line, line
        assert "FSDP1" in line and "fully_shard" in line, line
    assert lines[-1].endswith("changed=False"), lines[-1]
