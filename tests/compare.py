"""Lock-step comparison of two optimizers on identical problems: the tool every backend
test uses against the reference (and the reference against torch's optimizers)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

# (atol, rtol) by parameter dtype, after the number of steps the tests run.
TOLERANCE = {
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-4, 1e-3),
    torch.bfloat16: (1e-3, 1e-2),
    torch.float64: (1e-12, 1e-10),
}
ODD_SHAPES = [(), (1,), (4097,), (3, 5), (2, 3, 4), (0,), (64,)]


def make_params(shapes, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype=dtype, device=device))
            for s in shapes]


def copy_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params, step, seed=1, missing=()):
    """Deterministic non-zero gradients; params whose index is in ``missing(step)`` get None.

    Gradient scale varies from step to step so that priority keys rise and fall and the
    buffer both accepts and rejects inserts.
    """
    gen = torch.Generator().manual_seed(seed * 100003 + step)
    scale = 1.0 + 0.9 * torch.sin(torch.tensor(step * 0.7)).item()
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen) * scale
        p.grad = None if i in missing else g.to(dtype=p.dtype, device=p.device)


def assert_close(a, b, dtype, what):
    """Within the dtype's tolerance; a NaN must be a NaN on both sides (centered RMSprop
    with fp16 state can underflow square_avg below grad_avg², in torch's code too)."""
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# State entries compared exactly: the insert decisions and step counts must agree.
EXACT_STATE = ("cm_count", "cm_inserts", "step", "cm_pending")


def settled(opt, p) -> dict:
    """``opt.state[p]`` with any insert a step left pending written (cm_pending: AdamCM on
    the cpu backend), as copies: the optimizer itself keeps its pending inserts, so the
    next step still takes the deferred path."""
    from cm_fused.reference import flush_pending
    st = opt.state.get(p, {})
    if "cm_pending" not in st or st["cm_pending"].item() < 0:
        return st  # (the live dict: nothing is pending)
    st = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
    flush_pending(st["cm_buffer"], st["cm_sum"], st.get("cm_scales"), st["exp_avg"],
                  st["cm_pending"])
    return st


def assert_same_state(opt_a, params_a, opt_b, params_b, dtype, where=""):
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        assert_close(pa.detach(), pb.detach(), dtype, f"{where} param {i}")
        sa, sb = settled(opt_a, pa), settled(opt_b, pb)
        assert sa.keys() == sb.keys(), f"{where} param {i}: state keys {sa.keys()} != {sb.keys()}"
        for key in sa:
            if key in EXACT_STATE:
                assert torch.equal(sa[key].cpu(), sb[key].cpu()), \
                    f"{where} param {i} {key}: {sa[key]} != {sb[key]}"
            else:
                assert sa[key].dtype == sb[key].dtype, f"{where} param {i} {key} dtype"
                # the buffer's order is part of the contract (first-index tie-break)
                assert_close(sa[key], sb[key], dtype, f"{where} param {i} {key}")


def run_lockstep(make_a, make_b, shapes, steps, dtype=torch.float32, device="cpu",
                 missing=lambda step: (), compare_every=1, seed=0):
    """Step two optimizers built by ``make_a(params)``/``make_b(params)`` on copies of the
    same params with the same gradients; compare params and full state as they go."""
    params_a = make_params(shapes, dtype, device, seed)
    params_b = copy_params(params_a)
    opt_a, opt_b = make_a(params_a), make_b(params_b)
    for step in range(steps):
        for params, opt in ((params_a, opt_a), (params_b, opt_b)):
            set_grads(params, step, seed + 1, missing(step))
            torch.manual_seed(step)  # critical_test draws: the same for both optimizers
            opt.step()
        if (step + 1) % compare_every == 0 or step == steps - 1:
            assert_same_state(opt_a, params_a, opt_b, params_b, dtype, f"step {step}")
    return (opt_a, params_a), (opt_b, params_b)


def checkpoint_roundtrip(make_opt, shapes, steps_before, steps_after, dtype=torch.float32,
                         device="cpu", map_location=None, missing=lambda step: ()):
    """Run ``steps_before + steps_after`` steps uninterrupted, and again with a save (through
    bytes, loaded with ``weights_only=True``), a fresh optimizer and a load in between.
    Returns both (optimizer, params) pairs; callers assert they are bit-identical."""
    def drive(params, opt, steps):
        for step in steps:
            set_grads(params, step, 7, missing(step))
            torch.manual_seed(step)
            opt.step()

    params_a = make_params(shapes, dtype, device)
    params_b = copy_params(params_a)
    opt_a = make_opt(params_a)
    drive(params_a, opt_a, range(steps_before + steps_after))

    opt_b = make_opt(params_b)
    drive(params_b, opt_b, range(steps_before))
    ckpt = through_bytes({"params": [p.detach() for p in params_b], "opt": opt_b.state_dict()},
                         map_location)
    params_c = [torch.nn.Parameter(t.to(device).clone()) for t in ckpt["params"]]
    opt_c = make_opt(params_c)
    opt_c.load_state_dict(ckpt["opt"])
    drive(params_c, opt_c, range(steps_before, steps_before + steps_after))
    return (opt_a, params_a), (opt_c, params_c)


def through_bytes(obj, map_location=None):
    """``obj`` saved with torch.save and loaded back with ``weights_only=True``, as a
    checkpoint file would be."""
    import io

    blob = io.BytesIO()
    torch.save(obj, blob)
    blob.seek(0)
    return torch.load(blob, weights_only=True, map_location=map_location)


def assert_bit_identical(opt_a, params_a, opt_b, params_b):
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        assert torch.equal(pa.detach().cpu(), pb.detach().cpu()), f"param {i} differs"
        sa, sb = settled(opt_a, pa), settled(opt_b, pb)
        assert sa.keys() == sb.keys(), f"param {i}: state keys differ"
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, f"param {i} {key}: dtype differs"
            assert sa[key].device == sb[key].device, f"param {i} {key}: device differs"
            assert torch.equal(sa[key].cpu(), sb[key].cpu()), f"param {i} {key} differs"


def snapshot(opt, params):
    """Copies of params and their state, for assert_unchanged."""
    return ([p.detach().clone() for p in params],
            {i: {k: v.clone() for k, v in opt.state[p].items()}
             for i, p in enumerate(params) if p in opt.state})


def assert_unchanged(opt, params, snap):
    values, state = snap
    for i, (p, v) in enumerate(zip(params, values)):
        assert torch.equal(p.detach(), v), f"param {i} changed"
    for i, s in state.items():
        assert opt.state[params[i]].keys() == s.keys(), f"param {i}: state keys changed"
        for k, v in s.items():
            assert torch.equal(opt.state[params[i]][k], v), f"param {i} {k} changed"


def scaler_lockstep(make_opts, steps, overflow_at, device="cpu"):
    """Two identical small models, each with its optimizer (``make_opts(params_a,
    params_b)``) and its own torch.amp.GradScaler, stepped on the same data; at the steps
    in ``overflow_at`` a gradient overflows (the step is skipped, the scale halves).
    Yields ``(t, (params_a, params_b), opts, scalers)`` after every step."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(),
                                  torch.nn.Linear(32, 1)).to(device) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    params = [list(m.parameters()) for m in models]
    opts = make_opts(*params)
    scalers = [torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=4)
               for _ in range(2)]
    x = torch.randn(16, 6, device=device)
    for t in range(steps):
        for model, opt, scaler in zip(models, opts, scalers):
            opt.zero_grad()
            scaler.scale(model(x + 0.01 * t).pow(2).mean()).backward()
            if t in overflow_at:
                next(model.parameters()).grad[0, 0] = float("inf")
            torch.manual_seed(t)  # critical_test draws: the same for both optimizers
            scaler.step(opt)
            scaler.update()
        yield t, tuple(params), opts, scalers


def op_args(variant=None, extras=True, slot=torch.float32, dtype=torch.float32,
            optional=True, device="cpu"):
    """StepArgs for calling a step op directly, on three small tensors (some buffers
    full), for any variant: what the op tests of each backend feed it."""
    import math

    from cm_fused.contract import StepArgs, Variant
    from cm_fused.quantize import n_blocks
    variant = Variant.ADAM_CM if variant is None else Variant(variant)
    shapes = [(5,), (2, 3), ()]
    C = 3
    g = torch.Generator().manual_seed(0)
    rnd = lambda s, dt=dtype: torch.randn(s, generator=g).to(dt).to(device)  # noqa: E731
    state = lambda: [rnd(s).abs() for s in shapes]  # noqa: E731
    on = lambda t: t.to(device)  # noqa: E731
    moments = variant not in (Variant.SGD_CG, Variant.SGD_AM)
    buffered = variant.buffered
    args = StepArgs(
        params=[rnd(s) for s in shapes], grads=[rnd(s) for s in shapes], momenta=state(),
        second_moments=state() if moments else [],
        extras=state() if moments and extras and buffered else [],
        buffers=[(rnd((C, *s)) * 60).clamp(-127, 127).to(slot) if slot == torch.int8
                 else rnd((C, *s), slot) for s in shapes] if buffered else [],
        scales=[rnd((C, n_blocks(math.prod(s))), torch.float32).abs() for s in shapes]
        if buffered and slot == torch.int8 else [], moment_scales=[],
        keys=[rnd((C,), torch.float32).abs() for _ in shapes] if buffered else [],
        counts=[on(torch.tensor(k)) for k in (0, 2, 3)] if buffered else [],
        inserts=[on(torch.tensor(k)) for k in (0, 4, 9)] if buffered else [],
        sums=[rnd(s, torch.float32) for s in shapes] if buffered else [], pending=[],
        steps=[on(torch.tensor(float(k))) for k in (0, 2, 3)],
        memory=[] if buffered else (
            [on(torch.tensor([0.5, 1e-3, 0.3])) for _ in shapes] if variant == Variant.ADAM_AM
            else [on(torch.tensor([0.0, 0.0, 0.2]))]),
        variant=int(variant), lr=1e-3,
        lr_tensor=on(torch.tensor(2e-3)) if optional else None, beta1=0.9, beta2=0.999,
        eps=1e-8, weight_decay=0.01, dampening=0.1, key_decay=0.7, critical_test=0.3,
        lam=0.0 if buffered else 0.1, phase=0, synced=False,
        maximize=variant == Variant.ADAM_CG,
        grad_scale=on(torch.tensor(2.0)) if optional else None,
        found_inf=on(torch.tensor(0.0)) if optional else None,
        rand=on(torch.rand(len(shapes), generator=g)) if optional else None,
        rounding=None)
    return args


# The C++ kernel builds a subprocess can force with ATEN_CPU_CAPABILITY (the capability
# torch and the kernels then pick) besides this process's: the portable one (picked on CPUs
# without AVX2) and, on an AVX-512 CPU, AVX2's.
OTHER_KERNEL_BUILDS = ("default", "avx2")


def run_on_kernels(capability: str, body: str) -> None:
    """Run ``body`` (Python, indented as written) in a subprocess whose torch and C++ step
    use the kernel build of ``capability`` (an ATEN_CPU_CAPABILITY value: "default",
    "avx2"). The tests directory is on its path, torch on one thread; ``body`` must print
    "OK" when done. AVX2 is skipped unless this process runs AVX-512's build (else it runs
    AVX2's itself, or the CPU has no AVX2)."""
    import cm_fused.cpu
    if capability == "avx2" and cm_fused.cpu.kernel_name() != "AVX512":
        pytest.skip("this process runs the AVX2 build itself, or the CPU has none")
    script = textwrap.dedent("""
        import sys, torch
        torch.set_num_threads(1)
        sys.path.insert(0, sys.argv[1])
        import cm_fused.cpu
        print("KERNEL:", cm_fused.cpu.kernel_name())
    """) + textwrap.dedent(body)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"KERNEL: {capability.upper()}" in out.stdout and "OK" in out.stdout
