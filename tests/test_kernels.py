"""The optional CPU recurrence kernel (`kernels/`, the `attention_ctr_kernels` package) against
the plain-torch recurrences it stands in for. The README's setup installs it, so CI runs these."""

import os
import subprocess
import sys

import pytest
import torch

from attention_ctr.models import DIEN, ops, random_batch
from attention_ctr.models.recurrence import AUGRUCell

try:
    import attention_ctr_kernels as kernels
except ImportError:
    kernels = None

# Skipped only where the package is not installed (or switched off): a build that does not
# load here must fail these tests.
needs_kernels = pytest.mark.skipif(
    kernels is None
    or os.environ.get(kernels.ENV_SWITCH, "1").strip().lower() in {"0", "false", "no", "off"},
    reason="attention_ctr_kernels is not installed (pip install --no-build-isolation ./kernels)",
)


def _inputs(batch, length, size, seed=0, input_width=3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, input_width, generator=generator)
    weight_ih = torch.randn(3 * size, input_width, generator=generator)
    bias_ih = torch.randn(3 * size, generator=generator) * 0.1
    weight_hh = torch.randn(3 * size, size, generator=generator) * size**-0.5
    bias_hh = torch.randn(3 * size, generator=generator) * 0.1
    attention = torch.rand(batch, length, generator=generator)
    upstream = torch.randn(batch, length, size, generator=generator)
    return (x, weight_ih, bias_ih, weight_hh, bias_hh), attention, upstream


def _reference(x, weight_ih, bias_ih, weight_hh, bias_hh, attention=None, lengths=None):
    """All states, step by step in plain torch: `nn.GRU`'s equations, or the AUGRU's (update
    gate u = sigmoid(...) scaled by a_t); with `lengths`, a row's states after its length
    repeat its last one."""
    size = weight_hh.shape[1]
    h = x.new_zeros(x.shape[0], size)
    states = []
    for t in range(x.shape[1]):
        gi, gh = x[:, t] @ weight_ih.T + bias_ih, h @ weight_hh.T + bias_hh
        r = torch.sigmoid(gi[:, :size] + gh[:, :size])
        gate = torch.sigmoid(gi[:, size : 2 * size] + gh[:, size : 2 * size])
        candidate = torch.tanh(gi[:, 2 * size :] + r * gh[:, 2 * size :])
        if attention is None:
            new = (1 - gate) * candidate + gate * h
        else:
            new = h + attention[:, t : t + 1] * gate * (candidate - h)
        if lengths is not None:
            new = torch.where((t < lengths).unsqueeze(1), new, h)
        h = new
        states.append(h)
    return torch.stack(states, dim=1)


def _states_and_grads(function, inputs, attention, upstream):
    leaves = [t.clone().requires_grad_() for t in inputs]
    if attention is not None:
        attention = attention.clone().requires_grad_()
    states = function(*leaves, attention)
    wanted = leaves + ([attention] if attention is not None else [])
    return states, torch.autograd.grad(states, wanted, upstream)


@needs_kernels
def test_the_kernel_loads_the_build_for_this_cpu():
    assert kernels.available()
    assert kernels.matmul_backend() in {"brgemm", "blas", "aten"}
    capability = torch.backends.cpu.get_cpu_capability()
    build_for = {level: name for name, level in kernels.LEVELS.items()}
    expected = build_for.get(capability, "baseline")
    assert kernels.variant() == (expected if expected in kernels.built_variants() else "baseline")


_VARIANT_CHECK = """
import torch, attention_ctr_kernels as kernels
from test_kernels import _inputs, _reference
assert kernels.available() and kernels.variant() == "{variant}", kernels.variant()
inputs, attention, _ = _inputs(7, 6, 5, seed=4)
lengths = torch.tensor([6, 3, 0, 1, 6, 5, 2])
for a in (None, attention):
    got = kernels.gated_recurrence(*inputs, attention=a, lengths=lengths)
    torch.testing.assert_close(got, _reference(*inputs, a, lengths), atol=1e-5, rtol=1e-4)
"""


@needs_kernels
@pytest.mark.parametrize("variant", ["baseline", "avx2", "avx512"])
def test_each_build_runs_the_same_recurrence(variant):
    """The portable baseline and each instruction-set build, forced in a fresh interpreter (one
    build loads per process), computes the reference's states."""
    if variant not in kernels.built_variants():
        pytest.skip(f"no {variant} build on this architecture")
    levels = ["DEFAULT", "AVX2", "AVX512"]
    capability = torch.backends.cpu.get_cpu_capability()
    needed = {"baseline": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}[variant]
    if capability not in levels or levels.index(capability) < levels.index(needed):
        pytest.skip(f"this CPU cannot run the {variant} build")
    env = {**os.environ, kernels.ENV_SWITCH: variant, "PYTHONPATH": os.path.dirname(__file__)}
    done = subprocess.run(
        [sys.executable, "-c", _VARIANT_CHECK.format(variant=variant)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@needs_kernels
@pytest.mark.parametrize("augru", [False, True], ids=["gru", "augru"])
@pytest.mark.parametrize(
    "batch,length,size,input_width",
    [(37, 9, 5, 3), (64, 1, 16, 3), (3, 50, 64, 3), (600, 4, 8, 3), (37, 9, 13, 19)],
)
def test_kernel_matches_the_reference(augru, batch, length, size, input_width):
    """Same states and gradients (input, W_i, b_i, U, b_h, attention), for batches that are not
    a multiple of a task's rows, odd widths, and several chunks of rows per thread."""
    inputs, attention, upstream = _inputs(batch, length, size, input_width=input_width)
    attention = attention if augru else None
    got = _states_and_grads(kernels.gated_recurrence, inputs, attention, upstream)
    want = _states_and_grads(_reference, inputs, attention, upstream)
    torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("augru", [False, True], ids=["gru", "augru"])
def test_kernel_with_lengths_stops_each_row_and_final_only_is_its_last_state(augru):
    inputs, attention, upstream = _inputs(37, 9, 5)
    lengths = torch.randint(0, 10, (37,), generator=torch.Generator().manual_seed(1))
    lengths[0], lengths[-1] = 9, 0  # a full row and an empty one
    attention = attention if augru else None

    def stopped(*args):
        return kernels.gated_recurrence(*args[:5], attention=args[5], lengths=lengths)

    def reference(*args):
        return _reference(*args, lengths=lengths)

    got = _states_and_grads(stopped, inputs, attention, upstream)
    want = _states_and_grads(reference, inputs, attention, upstream)
    torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)
    final = kernels.gated_recurrence(*inputs, attention=attention, lengths=lengths, final_only=True)
    torch.testing.assert_close(final, got[0][:, -1].detach(), atol=0, rtol=0)
    assert not final[-1].any()  # the empty row: h_0


@needs_kernels
def test_kernel_rejects_lengths_outside_the_sequence_and_other_dtypes_by_name():
    inputs, attention, _ = _inputs(3, 4, 2)
    with pytest.raises(RuntimeError, match="row 1's length 5 is outside \\[0, L = 4\\]"):
        kernels.gated_recurrence(*inputs, attention=attention, lengths=torch.tensor([4, 5, 0]))
    (x, *weights), _, _ = _inputs(2, 2, 2)
    with pytest.raises(RuntimeError, match="gated_forward takes float32 CPU tensors, got Double"):
        torch.ops.attention_ctr_kernels.gated_forward(
            x.double(), *weights, attention[:2, :2], torch.empty(0), False, False
        )


@needs_kernels
def test_dien_cpu_training_takes_the_kernel_and_trains_like_the_reference(monkeypatch):
    """One training step of DIEN through `ops` with the kernel and with it switched off:
    the same loss and gradients (within float32 rounding)."""
    sizes = dict(n_items=40, n_categories=6, n_time_gap_buckets=5, max_history=7)

    def step(use_kernel: bool):
        monkeypatch.setattr(kernels, "_state", {"loaded": use_kernel and kernels._load()})
        torch.manual_seed(0)
        model = DIEN(**sizes, embedding_dim=4, mlp_hidden=[8], aux_hidden=[6, 3]).train()
        batch = random_batch(9, 7, **sizes, seed=3)
        logits, aux = model.forward_with_auxiliary(batch)
        loss = logits.square().mean() + aux
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    with_kernel, without = step(True), step(False)
    torch.testing.assert_close(with_kernel[0], without[0], atol=1e-5, rtol=1e-5)
    for name, grad in without[1].items():
        torch.testing.assert_close(with_kernel[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@needs_kernels
def test_ops_use_the_kernel_only_in_cpu_training():
    cell = AUGRUCell(3, 4).train()
    x, a = torch.randn(5, 6, 3, requires_grad=True), torch.rand(5, 6)
    assert "gated_forward" in type(ops.augru_final_state(cell, x, a).grad_fn).__name__
    with torch.no_grad():
        assert ops.augru_final_state(cell.eval(), x, a).grad_fn is None
    assert "gated_forward" not in type(ops.augru_final_state(cell, x, a).grad_fn).__name__


@needs_kernels
def test_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert not kernels.available()
    cell = AUGRUCell(3, 4).train()
    x, a = torch.randn(5, 6, 3, requires_grad=True), torch.rand(5, 6)
    assert "gated_forward" not in type(ops.augru_final_state(cell, x, a).grad_fn).__name__


@needs_kernels
def test_a_variant_not_built_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "avx512")
    monkeypatch.setattr(kernels, "built_variants", lambda: ["baseline"])
    with pytest.raises(ValueError, match=r"ATTENTION_CTR_CPU_KERNELS=avx512: not built here"):
        kernels.variant()


@needs_kernels
def test_a_build_for_another_torch_is_not_loaded(monkeypatch, caplog):
    """A torch upgraded after the kernel's install: the old build would crash or misbehave
    (torch's C++ ABI), so training warns, names the fix and runs the reference."""
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.delenv(kernels.ENV_SWITCH, raising=False)
    monkeypatch.setattr(kernels, "_built_for_torch", lambda: "2.5.0")
    with caplog.at_level("WARNING"):
        assert not kernels.available()
    assert "built for torch 2.5.0" in caplog.text and kernels.REINSTALL in caplog.text


def test_without_the_kernel_package_training_takes_the_reference(monkeypatch):
    monkeypatch.setattr(ops, "kernels", None)
    cell = AUGRUCell(3, 4).train()
    x, a = torch.randn(5, 6, 3, requires_grad=True), torch.rand(5, 6)
    states = ops.augru_final_state(cell, x, a)
    assert "gated_forward" not in type(states.grad_fn).__name__
    torch.testing.assert_close(states, cell.sequence(x, a))


@needs_kernels
@pytest.mark.parametrize("final_only", [False, True], ids=["states", "final"])
@pytest.mark.parametrize("augru", [False, True], ids=["gru", "augru"])
def test_the_op_passes_torch_library_opcheck(augru, final_only):
    """Schema, fake (shape) and autograd registrations, and tracing through AOT dispatch. Every
    row runs all steps here: with lengths, the buffers saved for the backward are left unwritten
    after a row's end (never read), which an output comparison would trip on."""
    assert kernels.available()
    inputs, attention, _ = _inputs(6, 5, 4)
    leaves = [t.requires_grad_() for t in inputs]
    attention = attention.requires_grad_() if augru else torch.empty(0)
    args = (*leaves, attention, torch.empty(0, dtype=torch.long), final_only, False)
    torch.library.opcheck(torch.ops.attention_ctr_kernels.gated_forward.default, args)
