"""The optional CPU recurrence kernel against the plain-torch recurrences it stands in for."""

import os
import time

import pytest
import torch

from attention_ctr import kernels
from attention_ctr.models import DIEN, ops, random_batch
from attention_ctr.models.recurrence import AUGRUCell

# Skipped only without a compiler (or switched off): a failed build must fail these tests.
needs_kernels = pytest.mark.skipif(
    not kernels.has_cxx_compiler()
    or os.environ.get(kernels.ENV_SWITCH, "1").strip().lower() in {"0", "false", "no", "off"},
    reason="the CPU recurrence kernel needs a C++ compiler",
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
def test_kernel_builds_where_there_is_a_compiler():
    assert kernels.available()
    assert kernels.matmul_backend() in {"brgemm", "blas", "aten"}


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


def test_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert not kernels.available()
    cell = AUGRUCell(3, 4).train()
    x, a = torch.randn(5, 6, 3, requires_grad=True), torch.rand(5, 6)
    assert "gated_forward" not in type(ops.augru_final_state(cell, x, a).grad_fn).__name__


def test_without_a_compiler_training_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.delenv(kernels.ENV_SWITCH, raising=False)
    monkeypatch.setattr(kernels, "has_cxx_compiler", lambda: False)
    with caplog.at_level("WARNING"):
        assert not kernels.available()
    assert "No C++ compiler" in caplog.text


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


def test_a_lock_left_by_a_killed_build_is_removed_not_waited_on(monkeypatch, tmp_path, caplog):
    """A first build killed half-way leaves `<build dir>/lock`; torch's build would wait on it
    forever (every later CPU training hung silently). An old lock is removed with a warning."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "py311_cpu" / "attention_ctr_kernels_test" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - kernels.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING"):
        kernels._clear_stale_build_lock("attention_ctr_kernels_test")
    assert not lock.exists()
    assert "did not finish" in caplog.text and str(lock) in caplog.text
