"""The fused C++ kernels against the eager torch code they replace."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attention_ctr.models import cpu_kernels
from attention_ctr.models.layers import (
    MLP,
    Dice,
    _DiceFunction,
    _GatedRecurrence,
    gated_recurrence,
    gather_positions,
)

# Skipped only without a compiler (or switched off): a failed build must fail these tests.
needs_kernels = pytest.mark.skipif(
    not cpu_kernels.has_cxx_compiler()
    or os.environ.get(cpu_kernels.ENV_SWITCH, "1").strip().lower() in {"0", "false", "no", "off"},
    reason="the fused CPU kernels need a C++ compiler",
)


@needs_kernels
def test_kernels_build_where_there_is_a_compiler():
    assert cpu_kernels.available()


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


def _eager(x, weight_ih, bias_ih, weight_hh, bias_hh, attention=None):
    """`gated_recurrence` without the kernels: the hand-written torch version."""
    attention = x.new_empty(0) if attention is None else attention
    projected = F.linear(x, weight_ih, bias_ih)
    return _GatedRecurrence.apply(projected, attention, weight_hh, bias_hh)


def _states_and_grads(function, inputs, attention, upstream):
    leaves = [t.clone().requires_grad_() for t in inputs]
    if attention is not None:
        attention = attention.clone().requires_grad_()
    states = function(*leaves, attention)
    wanted = leaves + ([attention] if attention is not None else [])
    return states, torch.autograd.grad(states, wanted, upstream)


@needs_kernels
@pytest.mark.parametrize("augru", [False, True], ids=["gru", "augru"])
@pytest.mark.parametrize(
    "batch,length,size,input_width",
    [(37, 9, 5, 3), (64, 1, 16, 3), (3, 50, 64, 3), (600, 4, 8, 3), (37, 9, 13, 19)],
)
def test_fused_recurrence_matches_eager(augru, batch, length, size, input_width):
    """Same states and gradients (input, W_i, b_i, U, b_h, attention) as the eager version,
    for batches that are not a multiple of a task's rows, widths that are not a vector's (nor
    of the 8 x 8 blocks that the weight gradients' operands are transposed by), and a batch
    of several chunks per thread (at most 256 rows run a time loop together)."""
    inputs, attention, upstream = _inputs(batch, length, size, input_width=input_width)
    attention = attention if augru else None
    fused = _states_and_grads(gated_recurrence, inputs, attention, upstream)
    eager = _states_and_grads(_eager, inputs, attention, upstream)
    assert type(fused[0].grad_fn).__name__ == "FusedGatedRecurrenceBackward"
    torch.testing.assert_close(fused[0], eager[0], atol=2e-6, rtol=1e-5)
    for got, want in zip(fused[1], eager[1]):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("augru", [False, True], ids=["gru", "augru"])
def test_fused_recurrence_reads_strided_inputs_and_gradients_uncopied(augru):
    """The input as a slice of a wider tensor (DIEN's history is a slice of one embedding) and
    a step-major upstream gradient give the same results as contiguous ones."""
    inputs, attention, upstream = _inputs(19, 7, 6)
    x, *weights = inputs
    weights = [w.requires_grad_() for w in weights]
    attention = attention.requires_grad_() if augru else None
    wider = torch.cat([x, torch.randn(19, 3, 3)], dim=1).requires_grad_()  # [B, L + 3, I]
    strided_up = upstream.transpose(0, 1).contiguous().transpose(0, 1)  # [B, L, H] step-major
    assert not wider[:, :7].is_contiguous() and not strided_up.is_contiguous()
    leaves = weights + ([attention] if augru else [])
    got = gated_recurrence(wider[:, :7], *weights, attention)
    got_grads = torch.autograd.grad(got, [wider, *leaves], strided_up)
    dense_x = x.clone().requires_grad_()
    want = gated_recurrence(dense_x, *weights, attention)
    want_grads = torch.autograd.grad(want, [dense_x, *leaves], upstream)
    assert type(got.grad_fn).__name__ == "FusedGatedRecurrenceBackward"
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(got_grads[0][:, :7], want_grads[0], atol=0, rtol=0)
    assert not got_grads[0][:, 7:].any()
    for a, b in zip(got_grads[1:], want_grads[1:]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def _lengths(batch, length, seed=1):
    lengths = torch.randint(0, length + 1, (batch,), generator=torch.Generator().manual_seed(seed))
    lengths[0], lengths[-1] = length, 0  # a full row and an empty one
    return lengths


def _per_row_reference(x, weight_ih, bias_ih, weight_hh, bias_hh, attention, lengths):
    """Each row's first lengths[b] steps through the eager recurrence, then its last state
    repeated (h_0 = 0 for an empty row)."""
    rows = []
    for b, n in enumerate(lengths.tolist()):
        last = x.new_zeros(1, weight_hh.shape[1])
        states = last[:0]
        if n:
            a = None if attention is None else attention[b : b + 1, :n]
            states = _eager(x[b : b + 1, :n], weight_ih, bias_ih, weight_hh, bias_hh, a)[0]
            last = states[-1:]
        rows.append(torch.cat([states, last.expand(x.shape[1] - n, -1)]))
    return torch.stack(rows)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "eager"])
@pytest.mark.parametrize("augru", [False, True], ids=["gru", "augru"])
@pytest.mark.parametrize("batch,length,size", [(37, 9, 5), (64, 1, 16), (5, 50, 64), (530, 6, 8)])
def test_recurrence_with_lengths_stops_each_row_at_its_length(
    kernels, augru, batch, length, size, monkeypatch
):
    """States and every gradient equal running each row alone over its real steps, with
    the kernels (which skip the rest) and in the eager fallback (which masks it)."""
    if kernels and not cpu_kernels.available():
        pytest.skip("the fused CPU kernels need a C++ compiler")
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "_state", {"loaded": False})
    inputs, attention, upstream = _inputs(batch, length, size)
    lengths = _lengths(batch, length)
    attention = attention if augru else None

    def stopped(*args):
        return gated_recurrence(*args, lengths=lengths)

    got = _states_and_grads(stopped, inputs, attention, upstream)
    want = _states_and_grads(
        lambda *args: _per_row_reference(*args, lengths), inputs, attention, upstream
    )
    expected = "FusedGatedRecurrenceBackward" if kernels else "_GatedRecurrenceBackward"
    assert type(got[0].grad_fn).__name__ == expected
    torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "eager"])
@pytest.mark.parametrize("augru", [False, True], ids=["gru", "augru"])
def test_final_only_is_each_rows_last_state(kernels, augru, monkeypatch):
    """`final_only` gives the state after each row's last step (h_0 = 0 for an empty row) and
    the same gradients as taking it from all the states."""
    if kernels and not cpu_kernels.available():
        pytest.skip("the fused CPU kernels need a C++ compiler")
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "_state", {"loaded": False})
    inputs, attention, _ = _inputs(37, 9, 5)
    lengths = _lengths(37, 9)
    attention = attention if augru else None
    upstream = torch.randn(37, 5, generator=torch.Generator().manual_seed(2))

    def final(*args):
        return gated_recurrence(*args, lengths=lengths, final_only=True)

    def last_of_all(*args):
        return gated_recurrence(*args, lengths=lengths)[:, -1]

    got = _states_and_grads(final, inputs, attention, upstream)
    want = _states_and_grads(last_of_all, inputs, attention, upstream)
    assert got[0].shape == (37, 5) and not got[0][-1].any()  # the empty row: h_0
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@needs_kernels
def test_kernels_reject_lengths_outside_the_sequence():
    inputs, attention, _ = _inputs(3, 4, 2)
    with pytest.raises(RuntimeError, match="row 1's length 5 is outside \\[0, L = 4\\]"):
        gated_recurrence(*inputs, attention, lengths=torch.tensor([4, 5, 0]))


@needs_kernels
def test_fused_augru_zero_attention_keeps_the_state_exactly():
    inputs, attention, _ = _inputs(8, 6, 4)
    attention[:, 3:] = 0.0  # padding after step 3
    states = gated_recurrence(*inputs, attention)
    for t in range(3, 6):
        assert torch.equal(states[:, t], states[:, 2])


@needs_kernels
def test_gated_recurrence_uses_the_kernels_for_float32_on_cpu():
    inputs, attention, _ = _inputs(4, 3, 2)
    x, *weights = inputs
    states = gated_recurrence(x.requires_grad_(), *weights, attention)
    assert type(states.grad_fn).__name__ == "FusedGatedRecurrenceBackward"
    # float64 keeps the eager version (exact, for gradcheck)
    states = gated_recurrence(*(t.double() for t in inputs))
    assert type(states.grad_fn).__name__ == "_GatedRecurrenceBackward"


@needs_kernels
def test_kernels_reject_other_dtypes_by_name():
    (x, weight_ih, bias_ih, weight_hh, bias_hh), attention, _ = _inputs(2, 2, 2)
    with pytest.raises(RuntimeError, match="gated_forward takes float32 CPU tensors, got Double"):
        torch.ops.attention_ctr_kernels.gated_forward(
            x.double(),
            weight_ih,
            bias_ih,
            weight_hh,
            bias_hh,
            attention,
            torch.empty(0),
            False,
            False,
        )


def test_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert not cpu_kernels.available()
    (x, *weights), attention, _ = _inputs(4, 3, 2)
    states = gated_recurrence(x.requires_grad_(), *weights, attention)
    assert type(states.grad_fn).__name__ == "_GatedRecurrenceBackward"


def test_without_a_compiler_training_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    monkeypatch.setattr(cpu_kernels, "has_cxx_compiler", lambda: False)
    with caplog.at_level("WARNING"):
        assert not cpu_kernels.available()
    assert "No C++ compiler" in caplog.text


@needs_kernels
@pytest.mark.parametrize("tiles", [0, 1, 3], ids=["no addend", "addend", "addend tiled 3x"])
def test_fused_bias_prelu_matches_eager(tiles):
    """PReLU(z + b + addend[r % M]) and its gradients (z, b, slopes, addend) against torch."""
    generator = torch.Generator().manual_seed(0)
    rows, columns = 301, 7  # not a multiple of a block's rows, nor of a vector's width
    period = rows if tiles <= 1 else 100
    total = period * max(tiles, 1)
    z = torch.randn(total, columns, generator=generator, requires_grad=True)
    bias = torch.randn(columns, generator=generator, requires_grad=True)
    slope = torch.rand(columns, generator=generator, requires_grad=True)
    addend = torch.randn(period, columns, generator=generator, requires_grad=True)
    upstream = torch.randn(total, columns, generator=generator)
    leaves = [z, bias, slope] + ([addend] if tiles else [])

    fused = cpu_kernels.bias_prelu(z, bias, slope, addend if tiles else None)
    x = z + bias
    if tiles:
        x = (x.view(-1, period, columns) + addend).view(total, columns)
    eager = F.prelu(x, slope)
    torch.testing.assert_close(fused, eager)
    for got, want in zip(
        torch.autograd.grad(fused, leaves, upstream), torch.autograd.grad(eager, leaves, upstream)
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("out_features", [1, 3, None])
def test_mlp_fused_prelu_layers_match_eager(monkeypatch, out_features):
    """PReLU MLPs in float32 CPU training take the kernels (the last layer together with a
    one-unit output); values and every parameter's gradient match the eager layers."""
    torch.manual_seed(0)
    mlp = MLP(6, [5, 4, 3], "prelu", out_features=out_features)
    x = torch.randn(9, 6)
    addend = torch.randn(3, 5)

    def run():
        product = F.linear(x, mlp.linears[0].weight)
        outputs = [mlp(x), mlp.after_first_product(product, addend)]
        grads = torch.autograd.grad(sum(o.sum() for o in outputs), list(mlp.parameters()))
        return outputs, grads

    fused_outputs, fused_grads = run()
    nodes = _graph_nodes(fused_outputs[1])
    assert "FusedBiasPReLUBackward" in nodes
    assert ("FusedPReLULinearBackward" in nodes) == (out_features == 1)
    monkeypatch.setattr(cpu_kernels, "usable", lambda *_: False)
    eager_outputs, eager_grads = run()
    assert "FusedBiasPReLUBackward" not in _graph_nodes(eager_outputs[1])
    for got, want in zip(fused_outputs + list(fused_grads), eager_outputs + list(eager_grads)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_mlp_keeps_eager_layers_under_bf16_autocast():
    mlp = MLP(6, [5, 4], "prelu", out_features=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not {"FusedBiasPReLUBackward", "FusedPReLULinearBackward"} & _graph_nodes(
            mlp(torch.randn(9, 6))
        )


def _graph_nodes(output):
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@needs_kernels
def test_fused_gather_positions_matches_indexing():
    torch.manual_seed(0)
    base = torch.randn(5, 9, 6, requires_grad=True)
    sources = [base[:, 1:8], base[:, :7] * 3]  # strided [5, 7, 6] views
    row, position = torch.tensor([0, 1, 1, 4]), torch.tensor([6, 0, 3, 2])
    gathered = gather_positions(sources, row, position)
    expected = torch.stack([x[row, position] for x in sources])
    assert type(gathered.grad_fn).__name__ == "FusedGatherPositionsBackward"
    torch.testing.assert_close(gathered, expected, rtol=0, atol=0)
    upstream = torch.randn_like(gathered)
    (got,) = torch.autograd.grad(gathered, base, upstream, retain_graph=True)
    (want,) = torch.autograd.grad(expected, base, upstream)
    torch.testing.assert_close(got, want)


@needs_kernels
@pytest.mark.parametrize("name", ["dien", "din", "pooling", "bst"])
def test_training_step_with_kernels_matches_eager(monkeypatch, name):
    """A whole training step (every fused path a model takes: the lookup, Dice, DIEN's
    recurrences, auxiliary net and row gather) against the same step with the kernels off: the
    click logits, the auxiliary loss and every parameter's gradient agree. BST's dropout is off
    here (the kernels draw other masks: see the dropout test)."""
    from attention_ctr.models import build_model, random_batch

    sizes = {"n_items": 40, "n_categories": 5, "n_time_gap_buckets": 7, "max_history": 12}
    options = {
        "dien": {"aux_activation": "prelu"},
        "bst": {"transformer_dropout": 0.0},
    }.get(name, {})
    batch = random_batch(33, 12, **sizes, seed=3)

    def step():
        torch.manual_seed(0)
        model = build_model(name, **sizes, **options).train()
        torch.manual_seed(1)  # same dropout masks
        logits, auxiliary = model.forward_with_auxiliary(batch)
        loss = logits.sum() + (auxiliary if auxiliary is not None else 0.0)
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        return [logits] + ([auxiliary] if auxiliary is not None else []) + list(grads)

    fused = step()
    monkeypatch.setattr(cpu_kernels, "_state", {"loaded": False})
    eager = step()
    for got, want in zip(fused, eager):
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("masked", [False, True], ids=["all rows", "masked rows"])
def test_fused_dice_matches_eager(masked):
    """Output, batch statistics and the gradients of x and alpha against `_DiceFunction`,
    for a row count that is not a block's and a width that is not a vector's."""
    generator = torch.Generator().manual_seed(0)
    rows, columns = 301, 7
    x = (torch.randn(rows, columns, generator=generator) * 3 + 1).requires_grad_()
    alpha = torch.rand(columns, generator=generator).requires_grad_()
    weights = (torch.rand(rows, generator=generator) > 0.3).float() if masked else None
    upstream = torch.randn(rows, columns, generator=generator)
    fused = cpu_kernels.FusedDice.apply(
        x, alpha, x.new_empty(0) if weights is None else weights, 1e-9
    )
    eager = _DiceFunction.apply(x, alpha, weights, 1e-9)
    for got, want in zip(fused, eager):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    got = torch.autograd.grad(fused[0], [x, alpha], upstream)
    want = torch.autograd.grad(eager[0], [x, alpha], upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


@needs_kernels
def test_dice_layer_trains_through_the_kernels():
    dice = Dice(5).train()
    x = torch.randn(6, 4, 5, requires_grad=True)
    out = dice(x, torch.arange(4) < torch.tensor([4, 3, 1, 2, 4, 0]).unsqueeze(-1))
    assert type(out.grad_fn).__name__ == "ViewBackward0"
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "FusedDiceBackward"


# The kernels' matmul backends below their default (oneDNN's brgemm where it runs), each forced
# by a switch that is read once per process.
WITHOUT_BRGEMM = "ATTENTION_CTR_KERNELS_NO_BRGEMM"  # BLAS (MKL's sgemm)
WITHOUT_BLAS = "ATTENTION_CTR_KERNELS_ATEN_GEMM"  # ATen's matmuls, as with no BLAS at all


def _assert_prints_same_without_blas(script, switch=WITHOUT_BLAS):
    """Runs `script` in a fresh process with `switch` set: it must print "same"."""
    environment = dict(os.environ, **{switch: "1"})
    finished = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.strip() == "same"


@needs_kernels
@pytest.mark.parametrize("switch", [WITHOUT_BRGEMM, WITHOUT_BLAS], ids=["blas", "aten"])
def test_recurrence_kernels_on_every_matmul_backend(switch):
    """Where brgemm does not run, the kernels' matmuls go to BLAS's sgemm, and where torch
    exposes no BLAS either, through ATen: the recurrences and the auxiliary head give the
    same results (in a fresh process each, as the choice is made once per process)."""
    script = """
import torch
from attention_ctr.models import cpu_kernels
from attention_ctr.models.layers import gated_recurrence
import tests.models.test_cpu_kernels as t
assert cpu_kernels.available()
inputs, attention, upstream = t._inputs(37, 9, 5)
lengths = t._lengths(37, 9)
for a in (None, attention):
    got = t._states_and_grads(lambda *x: gated_recurrence(*x, lengths=lengths), inputs, a, upstream)
    want = t._states_and_grads(
        lambda *x: t._per_row_reference(*x, lengths), inputs, a, upstream
    )
    torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, atol=5e-5, rtol=1e-4)
for widths in ((6, 4, 9, 5), (19, 12, 21, 10)):
    for tiles in (0, 2):
        t.test_fused_prelu_head_matches_eager(tiles, widths)
print("same")
"""
    _assert_prints_same_without_blas(script, switch)


@needs_kernels
def test_fused_pair_lookup_matches_the_embeddings():
    """Values and both tables' gradients against `torch.cat` of two `nn.Embedding` lookups
    (row 0 is padding: no gradient), with one of the outputs unused."""
    generator = torch.Generator().manual_seed(0)
    items = torch.nn.Embedding(40, 5, padding_idx=0)
    categories = torch.nn.Embedding(7, 3, padding_idx=0)
    ids = [torch.randint(0, 40, (9, k), generator=generator) for k in (1, 6, 6)]
    category_ids = [torch.randint(0, 7, (9, k), generator=generator) for k in (1, 6, 6)]
    ids[1][:, 4:] = 0  # padding
    fused = cpu_kernels.pair_lookup(items.weight, categories.weight, ids, category_ids)
    eager = [torch.cat([items(i), categories(c)], dim=-1) for i, c in zip(ids, category_ids)]
    for got, want in zip(fused, eager):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    upstream = [torch.randn(want.shape, generator=generator) for want in eager[:2]]
    tables = [items.weight, categories.weight]
    got = torch.autograd.grad(fused[:2], tables, upstream)
    want = torch.autograd.grad(eager[:2], tables, upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not got[0][0].any() and not got[1][0].any()


@needs_kernels
def test_fused_pair_lookup_names_ids_outside_the_tables():
    table = torch.zeros(4, 2)
    with pytest.raises(RuntimeError, match="item id 4 / category id 1 outside the tables"):
        cpu_kernels.pair_lookup(table, table, [torch.tensor([[1, 4]])], [torch.tensor([[1, 1]])])


@needs_kernels
def test_fused_concat_lookup_matches_the_embeddings():
    """BST's token lookup: the tables' rows side by side, and each table's gradient summed
    over its ids with none for the padding row 0; ids outside a table are named."""
    generator = torch.Generator().manual_seed(0)
    tables = [
        torch.randn(rows, width, generator=generator) for rows, width in [(9, 3), (4, 5), (6, 2)]
    ]
    tables = [t.requires_grad_() for t in tables]
    ids = [torch.randint(0, len(t), (7, 11), generator=generator) for t in tables]
    ids[0][0, :4] = 0  # padding
    got = cpu_kernels.concat_lookup(tables, ids)
    want = torch.cat([F.embedding(i, t, padding_idx=0) for t, i in zip(tables, ids)], dim=-1)
    assert type(got.grad_fn).__name__ == "FusedConcatLookupBackward"
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    upstream = torch.randn(got.shape, generator=generator)
    for a, b in zip(
        torch.autograd.grad(got, tables, upstream), torch.autograd.grad(want, tables, upstream)
    ):
        torch.testing.assert_close(a, b)
        assert not a[0].any()
    with pytest.raises(RuntimeError, match="got id 4 outside table 1"):
        cpu_kernels.concat_lookup(tables[:2], [torch.tensor([1]), torch.tensor([4])])


@needs_kernels
@pytest.mark.parametrize("tiles", [0, 2], ids=["no addend", "addend tiled 2x"])
@pytest.mark.parametrize("widths", [(6, 4, 9, 5), (19, 12, 21, 10)], ids=["narrow", "wide"])
def test_fused_prelu_head_matches_eager(tiles, widths):
    """DIEN's auxiliary head in one kernel against eager torch: logits and every gradient,
    with the first weight's two parts column slices of one weight (as DIEN passes them), the
    shared part used by `tiles` rows each, rows spanning several blocks, not a multiple of
    one, and `widths` (input, shared, hidden layers) below and across the 8 x 8 blocks that
    the weight gradients' operands are transposed by."""
    generator = torch.Generator().manual_seed(0)
    period = 301
    inputs, shared_width, first, second = widths
    rows = period * max(tiles, 1)
    x = torch.randn(rows, inputs, generator=generator, requires_grad=True)
    wide = torch.randn(first, shared_width + inputs, generator=generator, requires_grad=True)
    shared = torch.randn(period, shared_width, generator=generator, requires_grad=True)
    params = [
        torch.randn(first, generator=generator),  # b1
        torch.rand(first, generator=generator),  # s1
        torch.randn(second, first, generator=generator),  # w2
        torch.randn(second, generator=generator),  # b2
        torch.rand(second, generator=generator),  # s2
        torch.randn(1, second, generator=generator),  # w_out
        torch.randn(1, generator=generator),  # b_out
    ]
    params = [p.requires_grad_() for p in params]
    b1, s1, w2, b2, s2, w_out, b_out = params
    w_shared, w1 = wide[:, :shared_width], wide[:, shared_width:]
    upstream = torch.randn(rows, 1, generator=generator)
    leaves = [x, wide, *params] + ([shared] if tiles else [])
    empty = x.new_empty(0)
    fused = cpu_kernels.FusedPReLUHead.apply(
        x, w1, *((shared, w_shared) if tiles else (empty, empty)), *params
    )
    z = F.linear(x, w1, b1)
    if tiles:
        z = (z.view(tiles, period, first) + F.linear(shared, w_shared)).view(rows, first)
    eager = F.linear(F.prelu(F.linear(F.prelu(z, s1), w2, b2), s2), w_out, b_out)
    # float32 rounding grows with the sums' terms: errors relative to each result's largest
    _assert_close_to_scale(fused, eager, 1e-5)
    got = torch.autograd.grad(fused, leaves, upstream)
    want = torch.autograd.grad(eager, leaves, upstream)
    for a, b in zip(got, want):
        _assert_close_to_scale(a, b, 1e-4)


@needs_kernels
def test_fused_dropout_keeps_scales_and_regenerates_its_mask():
    """BST's dropout through the kernels: kept elements scaled by 1 / P(keep), about 1 - p of
    them kept, the same mask on the gradient, seeded runs repeat and calls differ."""
    from attention_ctr.models.bst import fast_dropout

    x = torch.randn(64, 51, 96, requires_grad=True)
    torch.manual_seed(0)
    out = fast_dropout(x, 0.1, True)
    kept = out != 0
    scale = 32768 / (32768 - round(0.1 * 32768))
    assert type(out.grad_fn).__name__ == "FusedDropoutBackward"
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    torch.testing.assert_close(out[kept], x[kept] * scale)
    upstream = torch.randn_like(x)
    (grad,) = torch.autograd.grad(out, x, upstream)
    torch.testing.assert_close(grad, torch.where(kept, upstream * scale, 0.0))
    torch.manual_seed(0)
    assert torch.equal(fast_dropout(x, 0.1, True), out)
    assert not torch.equal(fast_dropout(x, 0.1, True) != 0, kept)


# -- bf16 autocast: the kernels round their matmuls' operands, nothing else ------------------


def _bf16(t):
    return t.bfloat16().float()


def _rounded_recurrence(x, weight_ih, bias_ih, weight_hh, bias_hh, attention, lengths):
    """`gated_recurrence` with every matmul operand (x_t, h_{t-1}, the weights) rounded to
    bf16 and everything else float32: what the kernels compute under bf16 autocast."""
    size = weight_hh.shape[1]
    h = x.new_zeros(x.shape[0], size)
    states = []
    for t in range(x.shape[1]):
        gx = _bf16(x[:, t]) @ _bf16(weight_ih).T + bias_ih
        gh = _bf16(h) @ _bf16(weight_hh).T + bias_hh
        reset = torch.sigmoid(gx[:, :size] + gh[:, :size])
        gate = torch.sigmoid(gx[:, size : 2 * size] + gh[:, size : 2 * size])
        candidate = torch.tanh(gx[:, 2 * size :] + reset * gh[:, 2 * size :])
        if attention is None:
            new = candidate + gate * (h - candidate)
        else:
            new = h + attention[:, t : t + 1] * gate * (candidate - h)
        h = torch.where((t < lengths).unsqueeze(-1), new, h)
        states.append(h)
    return torch.stack(states, dim=1)


def _assert_close_to_scale(got, want, tolerance):
    """Largest difference within `tolerance` of the largest value (bf16-rounded gradients)."""
    assert (got - want).abs().max() <= tolerance * want.abs().max()


def check_bf16_recurrence(augru):
    """Under bf16 autocast: float32 states equal to the rounded reference (to float32
    rounding), visibly off the float32 kernels' (so the rounding happened), and gradients
    within bf16 precision of the reference's (the kernels round the gradients' matmul operands
    too, as autocast's backward does)."""
    inputs, attention, upstream = _inputs(37, 9, 20)
    attention = attention if augru else None
    lengths = _lengths(37, 9)

    def recurrence(*args):
        return gated_recurrence(*args, lengths=lengths)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _states_and_grads(recurrence, inputs, attention, upstream)
    float32 = _states_and_grads(recurrence, inputs, attention, upstream)
    want = _states_and_grads(
        lambda *args: _rounded_recurrence(*args, lengths), inputs, attention, upstream
    )
    assert type(got[0].grad_fn).__name__ == "FusedGatedRecurrenceBackward"
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert (got[0] - float32[0]).abs().max() > 1e-3
    for g, w in zip(got[1], want[1]):
        _assert_close_to_scale(g, w, 2e-2)


@needs_kernels
@pytest.mark.parametrize("augru", [False, True], ids=["gru", "augru"])
def test_recurrence_under_bf16_autocast_rounds_only_the_matmul_operands(augru):
    check_bf16_recurrence(augru)


@needs_kernels
def test_bf16_matmuls_without_mkl_widen_the_rounded_operands():
    """Where torch exposes no MKL bf16 matmul (forced here by the switch, in a fresh process),
    the rounded operands are widened to float32: the same results."""
    script = """
import tests.models.test_cpu_kernels as t
for augru in (False, True):
    t.check_bf16_recurrence(augru)
t.check_bf16_head()
print("same")
"""
    _assert_prints_same_without_blas(script)


def check_bf16_head():
    """DIEN's auxiliary head under bf16 autocast against the rounded reference (its two layers'
    matmul operands and the shared part's rounded to bf16, the output unit float32), over two
    tiles of a shared part and blocks that are not full."""
    generator = torch.Generator().manual_seed(0)
    period, inputs, shared_width, first, second = 301, 24, 16, 40, 20
    x = torch.randn(2 * period, inputs, generator=generator, requires_grad=True)
    wide = torch.randn(first, shared_width + inputs, generator=generator) * 0.2
    shared = torch.randn(period, shared_width, generator=generator, requires_grad=True)
    params = [
        torch.randn(first, generator=generator),  # b1
        torch.rand(first, generator=generator),  # s1
        torch.randn(second, first, generator=generator) * 0.2,  # w2
        torch.randn(second, generator=generator),  # b2
        torch.rand(second, generator=generator),  # s2
        torch.randn(1, second, generator=generator),  # w_out
        torch.randn(1, generator=generator),  # b_out
    ]
    leaves = [x, shared, wide.requires_grad_(), *(p.requires_grad_() for p in params)]
    b1, s1, w2, b2, s2, w_out, b_out = params
    w_shared, w1 = wide[:, :shared_width], wide[:, shared_width:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cpu_kernels.FusedPReLUHead.apply(x, w1, shared, w_shared, *params)
    z = (_bf16(x) @ _bf16(w1).T + b1).view(2, period, first)
    z = (z + _bf16(shared) @ _bf16(w_shared).T).view(-1, first)
    hidden = F.prelu(_bf16(F.prelu(z, s1)) @ _bf16(w2).T + b2, s2)
    want = F.linear(hidden, w_out, b_out)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    float32 = cpu_kernels.FusedPReLUHead.apply(x, w1, shared, w_shared, *params)
    assert (got - float32).abs().max() > 1e-3
    upstream = torch.randn(got.shape, generator=generator)
    for g, w in zip(
        torch.autograd.grad(got, leaves, upstream), torch.autograd.grad(want, leaves, upstream)
    ):
        _assert_close_to_scale(g, w, 2e-2)


@needs_kernels
def test_prelu_head_under_bf16_autocast_rounds_only_the_matmul_operands():
    check_bf16_head()


@needs_kernels
def test_dien_trains_through_the_kernels_under_bf16_autocast():
    """A DIEN step under CPU bf16 autocast takes the lookup, recurrence, gather and head
    kernels, and its losses are the float32 step's to bf16 precision."""
    from attention_ctr.models import build_model, random_batch

    sizes = {"n_items": 40, "n_categories": 5, "n_time_gap_buckets": 7, "max_history": 12}
    batch = random_batch(33, 12, **sizes, seed=3)
    torch.manual_seed(0)
    model = build_model("dien", **sizes).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, auxiliary = model.forward_with_auxiliary(batch)
    nodes = _graph_nodes(auxiliary) | _graph_nodes(logits)
    assert {
        "FusedPairLookupBackward",
        "FusedGatedRecurrenceBackward",
        "FusedGatherPositionsBackward",
        "FusedPReLUHeadBackward",
    } <= nodes
    logits_32, auxiliary_32 = model.forward_with_auxiliary(batch)
    torch.testing.assert_close(auxiliary, auxiliary_32, atol=0, rtol=2e-2)
    _assert_close_to_scale(logits, logits_32, 5e-2)


def _sdpa_reference(qkv, keep, heads):
    """BST's eager attention on a packed projection: SDPA with the finfo.min key mask."""
    batch, length, width = qkv.shape
    q, k, v = qkv.view(batch, length, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)
    mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    return attended.transpose(1, 2).reshape(batch, length, width // 3)


@needs_kernels
@pytest.mark.parametrize(
    "batch, length, heads, dim",
    [(5, 1, 2, 3), (7, 13, 2, 6), (3, 51, 4, 24), (4, 40, 8, 12), (2, 70, 1, 40)],
)
def test_packed_attention_matches_sdpa(batch, length, heads, dim):
    """BST's attention kernel against SDPA with the same mask, in values and qkv's gradient,
    for lengths and head sizes on and off its tile sizes; masked keys get exactly zero weight:
    their contents change nothing, and their k and v get no gradient."""
    assert cpu_kernels.available()
    generator = torch.Generator().manual_seed(length)
    qkv = torch.randn(batch, length, 3 * heads * dim, generator=generator, requires_grad=True)
    bias = torch.randn(3 * heads * dim, generator=generator, requires_grad=True)
    keep = torch.rand(batch, length, generator=generator) < 0.6
    keep[:, -1] = True  # BST's target: never masked
    keep[0] = False
    keep[0, 0] = True  # a row attending to one key only
    got = cpu_kernels.packed_attention(qkv, bias, keep, heads)
    want = _sdpa_reference(qkv + bias, keep, heads)
    assert type(got.grad_fn).__name__ == "FusedPackedAttentionBackward"
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    upstream = torch.randn(got.shape, generator=generator)
    d_got = torch.autograd.grad(got, [qkv, bias], upstream)
    d_want = torch.autograd.grad(want, [qkv, bias], upstream)
    for a, b in zip(d_got, d_want):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)
    assert not d_got[0].view(batch, length, 3, -1)[:, :, 1:][~keep].any()
    without_bias = cpu_kernels.packed_attention(qkv + bias, None, keep, heads)
    torch.testing.assert_close(without_bias, got, atol=2e-6, rtol=1e-5)

    changed = qkv.detach().clone()
    key_and_value = changed.view(batch, length, 3, -1)[:, :, 1:]
    key_and_value[~keep] = 1e4  # masked keys' k and v
    same = cpu_kernels.packed_attention(changed, bias, keep, heads)
    torch.testing.assert_close(same, got.detach(), atol=0, rtol=0)


@needs_kernels
def test_packed_attention_names_bad_inputs():
    assert cpu_kernels.available()
    qkv = torch.randn(2, 5, 12)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1] = False
    with pytest.raises(RuntimeError, match="every batch row to keep at least one key"):
        cpu_kernels.packed_attention(qkv, None, keep, 2)
    with pytest.raises(RuntimeError, match=r"qkv \[B, S, 3 H D\] for 5 heads"):
        cpu_kernels.packed_attention(qkv, None, keep | True, 5)
    with pytest.raises(RuntimeError, match="takes float32"):
        cpu_kernels.packed_attention(qkv.double(), None, keep | True, 2)
    with pytest.raises(RuntimeError, match=r"a bias \[3 H D\] = \[12\] or none"):
        cpu_kernels.packed_attention(qkv, torch.zeros(4), keep | True, 2)


@needs_kernels
def test_transformer_block_attention_through_the_kernel_under_bf16_autocast(monkeypatch):
    """Under CPU bf16 autocast BST's block still attends in float32, through the kernel, and its
    Linears' epilogues run fused in float32: the same output (to bf16's rounding) and input
    gradient as its eager path."""
    from attention_ctr.models.bst import TransformerBlock

    torch.manual_seed(0)
    block = TransformerBlock(16, 2, 16, dropout=0.0).train()
    x = torch.randn(6, 9, 16, requires_grad=True)
    keep = torch.rand(6, 9) < 0.7
    keep[:, -1] = True

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x, keep)
        (d_x,) = torch.autograd.grad(out.float().sum(), x)
        return out.float(), d_x, _graph_nodes(out)

    out, d_x, nodes = run()
    assert {"FusedPackedAttentionBackward", "FusedBiasDropoutBackward"} <= nodes
    monkeypatch.setattr(cpu_kernels, "_state", {"loaded": False})
    eager_out, eager_d_x, eager_nodes = run()
    assert "FusedPackedAttentionBackward" not in eager_nodes
    torch.testing.assert_close(out, eager_out, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(d_x, eager_d_x, atol=3e-2, rtol=2e-2)


@needs_kernels
@pytest.mark.parametrize("leaky, residual", [(False, True), (True, False), (False, False)])
def test_bias_dropout_is_bias_activation_dropout_and_residual_in_one(leaky, residual):
    """BST's fused Linear epilogue against the same steps one by one (the dropout kernel with
    the same seed): the same values (to the compiler's fused multiply-adds), the same gradients
    for the product, the bias and the residual; threshold 0 keeps everything."""
    assert cpu_kernels.available()
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(37, 21, generator=generator, requires_grad=True)
    bias = torch.randn(21, generator=generator, requires_grad=True)
    skip = torch.randn(37, 21, generator=generator, requires_grad=True) if residual else None
    slope = 0.01 if leaky else None
    upstream = torch.randn(37, 21, generator=generator)
    inputs = [z, bias] + ([skip] if residual else [])

    def eager(threshold):
        y = z + bias
        y = F.leaky_relu(y, slope) if leaky else y
        y = cpu_kernels.dropout(y, threshold) if threshold else y
        return skip + y if residual else y

    for threshold in (0, 3277):
        torch.manual_seed(5)
        got = cpu_kernels.bias_dropout(z, bias, threshold, skip, slope)
        torch.manual_seed(5)
        want = eager(threshold)
        assert type(got.grad_fn).__name__ == "FusedBiasDropoutBackward"
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        if threshold:
            dropped = (got - (skip if residual else 0)) == 0
            assert 0.05 < dropped.float().mean() < 0.2
        for a, b in zip(
            torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream)
        ):
            torch.testing.assert_close(a, b)


@needs_kernels
def test_transformer_block_trains_through_the_fused_epilogues():
    from attention_ctr.models.bst import TransformerBlock

    torch.manual_seed(0)
    block = TransformerBlock(16, 2, 24, dropout=0.1).train()
    out = block(torch.randn(3, 7, 16), torch.ones(3, 7, dtype=torch.bool))
    nodes = _graph_nodes(out)
    assert "FusedBiasDropoutBackward" in nodes and "FusedPackedAttentionBackward" in nodes
    assert "FusedDropoutBackward" not in nodes
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


@needs_kernels
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_din_unit_on_real_positions_through_the_kernels_matches_eager(monkeypatch, normalization):
    """DIN's activation unit on the real positions (the unit input `[h, h * t]` and the
    per-target term through the kernels) gives the eager scores and gradients, with a sample
    that has no real position at all and one that has every position."""
    from attention_ctr.models.layers import DINAttention

    torch.manual_seed(0)
    unit = DINAttention(6, (5, 4), "dice", normalization).train()
    history = torch.randn(7, 9, 6)
    target = torch.randn(7, 6)
    lengths = torch.tensor([3, 0, 9, 1, 5, 8, 2])
    mask = torch.arange(9) < lengths[:, None]

    def run():
        leaves = [history.clone().requires_grad_(), target.clone().requires_grad_()]
        weights = unit.weights(*leaves, mask)
        upstream = torch.linspace(-1, 1, weights.numel()).view_as(weights)
        grads = torch.autograd.grad(weights, leaves + list(unit.parameters()), upstream)
        return weights, grads

    calls = []
    original = cpu_kernels.FusedDINUnitInput.apply
    monkeypatch.setattr(
        cpu_kernels.FusedDINUnitInput, "apply", lambda *args: calls.append(1) or original(*args)
    )
    got, got_grads = run()
    assert calls, "the kernels' path was not taken"
    monkeypatch.setattr(cpu_kernels, "_state", {"loaded": False})
    want, want_grads = run()
    assert not got[~mask].any()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not got_grads[0][~mask].any()  # padding rows get no gradient


@needs_kernels
def test_din_unit_kernels_name_an_index_that_is_not_ascending():
    history, target = torch.randn(2, 3, 4), torch.randn(2, 4)
    for index in (torch.tensor([0, 2, 1]), torch.tensor([0, 6]), torch.tensor([1, 1])):
        with pytest.raises(RuntimeError, match=r"din_unit_input_forward's index\[\d\] = "):
            torch.ops.attention_ctr_kernels.din_unit_input_forward(history, target, index)
    with pytest.raises(RuntimeError, match="sample_rows_forward's index"):
        torch.ops.attention_ctr_kernels.sample_rows_forward(target, torch.tensor([5, 4]), 3)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 301, 5000], ids=["1 row", "301 rows", "5000 rows"])
def test_fused_linear_matches_f_linear(rows):
    """The kernels' Linear against F.linear: values and every gradient, with a bias and an
    addend, rows spanning several row blocks (not a multiple of one) or just one row."""
    assert cpu_kernels.available()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 37, generator=generator, requires_grad=True)
    weight = torch.randn(23, 37, generator=generator, requires_grad=True)
    bias = torch.randn(23, generator=generator, requires_grad=True)
    addend = torch.randn(rows, 23, generator=generator, requires_grad=True)
    empty = x.new_empty(0)
    for b, a in [(bias, addend), (bias, None), (None, None)]:
        got = cpu_kernels.FusedLinear.apply(
            x, weight, empty if b is None else b, empty if a is None else a
        )
        want = F.linear(x, weight, b) + (0 if a is None else a)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        leaves = [t for t in (x, weight, b, a) if t is not None]
        upstream = torch.randn(got.shape, generator=generator)
        for g, w in zip(
            torch.autograd.grad(got, leaves, upstream), torch.autograd.grad(want, leaves, upstream)
        ):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@needs_kernels
def test_linear_takes_the_kernels_only_where_they_pay():
    """`cpu_kernels.linear` is the fused Linear for float32 training on brgemm from
    LINEAR_MIN_ROWS rows and LINEAR_MIN_OUTPUTS units on, and F.linear otherwise (eval, bf16
    autocast, small products, other matmul backends): the same values either way."""
    assert cpu_kernels.matmul_backend() in {"brgemm", "blas", "aten"}
    rows = cpu_kernels.LINEAR_MIN_ROWS
    x = torch.randn(2, rows // 2, 16, requires_grad=True)
    weight = torch.randn(cpu_kernels.LINEAR_MIN_OUTPUTS, 16, requires_grad=True)
    out = cpu_kernels.linear(x, weight)
    fused = cpu_kernels.matmul_backend() == "brgemm"
    assert out.shape == (2, rows // 2, weight.shape[0])
    assert (type(out.grad_fn.next_functions[0][0]).__name__ == "FusedLinearBackward") == fused
    torch.testing.assert_close(out, F.linear(x, weight), atol=1e-5, rtol=1e-5)
    assert not cpu_kernels.linear_fuses(x[:1, :1], weight.shape[0])  # too few rows
    assert not cpu_kernels.linear_fuses(x, 1)  # a one-unit output
    with torch.no_grad():
        assert not cpu_kernels.linear_fuses(x, weight.shape[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_kernels.linear(x, weight).dtype == torch.bfloat16


@needs_kernels
def test_fused_row_dots_and_weighted_sum_match_bmm():
    """The per-sample matrix-vector products against bmm, values and gradients, on a strided
    view of a wider tensor (as DIEN's history is a slice of one lookup); a weighted sum does
    not read positions of weight 0, so padding holding NaN cannot reach it."""
    assert cpu_kernels.available()
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(7, 11, 9, generator=generator, requires_grad=True)
    x = wide[:, :, 2:8]  # [7, 11, 6], strided
    v = torch.randn(7, 6, generator=generator, requires_grad=True)
    w = torch.rand(7, 11, generator=generator, requires_grad=True)
    cases = [
        (cpu_kernels.row_dots(x, v), torch.bmm(x, v.unsqueeze(-1)).squeeze(-1), [wide, v]),
        (cpu_kernels.weighted_sum(w, x), torch.bmm(w.unsqueeze(1), x).squeeze(1), [wide, w]),
    ]
    for got, want, leaves in cases:
        assert type(got.grad_fn).__name__.startswith("Fused")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        upstream = torch.randn(got.shape, generator=generator)
        for g, r in zip(
            torch.autograd.grad(got, leaves, upstream), torch.autograd.grad(want, leaves, upstream)
        ):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    padded = torch.randn(2, 3, 4, generator=generator)
    padded[:, 2] = float("nan")
    weights = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    total = cpu_kernels.weighted_sum(weights, padded)
    want = torch.stack([0.5 * (padded[0, 0] + padded[0, 1]), padded[1, 0]])
    torch.testing.assert_close(total, want)
