"""Specification of the Transformer-XL memory encoder (DESIGN.md, "Public contract")."""

import itertools
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from trxl_rl import MemoryState, TransformerXL, TrXLConfig
from trxl_rl.memory import POSITIONAL_ENCODINGS

INPUT_DIM = 5


def make_model(seed: int = 0, **overrides) -> TransformerXL:
    """A small model with weights large enough that every path changes the output."""
    torch.manual_seed(seed)
    kwargs = dict(input_dim=INPUT_DIM, dim=16, num_layers=2, num_heads=4, memory_length=7)
    kwargs.update(overrides)
    model = TransformerXL(TrXLConfig(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def run_steps(model: TransformerXL, x: torch.Tensor, starts: torch.Tensor, state=None):
    """Feed ``x`` ``[B, T, I]`` one token at a time; returns ``([B, T, D], state)``."""
    state = model.initial_state(x.shape[0]) if state is None else state
    ys = []
    for t in range(x.shape[1]):
        y, state = model.step(x[:, t], state, starts[:, t])
        ys.append(y)
    return torch.stack(ys, 1), state


def run_split(model: TransformerXL, x, starts, cuts, state=None, kv_cache=True):
    """Feed ``x`` in segments ending at ``cuts``; returns ``([B, T, D], state)``."""
    state = model.initial_state(x.shape[0], kv_cache=kv_cache) if state is None else state
    ys, begin = [], 0
    for end in [*cuts, x.shape[1]]:
        if end > begin:
            y, state = model(x[:, begin:end], state, starts[:, begin:end])
            ys.append(y)
            begin = end
    return torch.cat(ys, 1), state


CONFIGS = list(itertools.product(POSITIONAL_ENCODINGS, [False, True], ["pre", "post"],
                                 [0, 1, 7, 64]))


@pytest.mark.parametrize("encoding,gating,norm,memory_length", CONFIGS)
def test_step_equals_segment_for_any_split_and_episode_starts(encoding, gating, norm,
                                                              memory_length):
    model = make_model(positional_encoding=encoding, gating=gating, norm=norm,
                       memory_length=memory_length)
    case = f"{encoding}-{gating}-{norm}-{memory_length}"
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    batch, length = 3, 90
    x = torch.randn(batch, length, INPUT_DIM, generator=gen)
    starts = torch.rand(batch, length, generator=gen) < 0.08
    starts[1, 40] = True  # at least one start in the middle of a segment
    with torch.no_grad():
        whole, _ = model(x, model.initial_state(batch), starts)
        stepped, _ = run_steps(model, x, starts)
        cuts = sorted(torch.randint(1, length, (6,), generator=gen).tolist())
        split, _ = run_split(model, x, starts, cuts, kv_cache=False)
        split_cached, _ = run_split(model, x, starts, cuts, kv_cache=True)
    for other in (stepped, split, split_cached):
        assert (whole - other).abs().max().item() <= 1e-5


@pytest.mark.parametrize("encoding", POSITIONAL_ENCODINGS)
@pytest.mark.parametrize("mode", ["segment", "step"])
def test_outputs_after_episode_start_equal_a_fresh_state(encoding, mode):
    model = make_model(positional_encoding=encoding)
    torch.manual_seed(1)
    batch, length, start = 2, 30, 17
    x = torch.randn(batch, length, INPUT_DIM)
    starts = torch.zeros(batch, length, dtype=torch.bool)
    starts[:, start] = True
    run = run_steps if mode == "step" else (lambda m, x, s: m(x, m.initial_state(x.shape[0]), s))
    with torch.no_grad():
        y, _ = run(model, x, starts)
        fresh, _ = run(model, x[:, start:], starts[:, start:])
    assert torch.allclose(y[:, start:], fresh, atol=1e-6)
    # ...and the earlier tokens did matter before the start (the test has teeth).
    with torch.no_grad():
        y_no_reset, _ = run(model, x, torch.zeros_like(starts))
    assert not torch.allclose(y_no_reset[:, start:], fresh, atol=1e-4)


def test_state_reset_forgets_only_the_masked_rows():
    model = make_model()
    x = torch.randn(2, 10, INPUT_DIM)
    no_starts = torch.zeros(2, 10, dtype=torch.bool)
    with torch.no_grad():
        _, state = model(x, model.initial_state(2), no_starts)
        state = state.reset(torch.tensor([True, False]))
        y, _ = model(x, state, no_starts)
        fresh, _ = model(x, model.initial_state(2), no_starts)
        continued, _ = model(x, model(x, model.initial_state(2), no_starts)[1], no_starts)
    assert torch.allclose(y[0], fresh[0], atol=1e-6)
    assert torch.allclose(y[1], continued[1], atol=1e-6)


def test_memory_is_stop_gradient_but_projected_with_current_weights():
    model = make_model().train()
    x_prev = torch.randn(2, 9, INPUT_DIM)
    no_starts = torch.zeros(2, 9, dtype=torch.bool)
    with torch.no_grad():
        _, state = model(x_prev, model.initial_state(2), no_starts)
    hidden = state.hidden.clone().requires_grad_(True)
    state = MemoryState(hidden=hidden, valid=state.valid, position=state.position)
    x = torch.randn(2, 4, INPUT_DIM, requires_grad=True)
    y, new_state = model(x, state, no_starts[:, :4])
    y.square().sum().backward()
    assert hidden.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())
    assert not new_state.hidden.requires_grad

    # Gradient reaches the key/value weights through the memory tokens too: the loss of the
    # first query (which sees memory and itself) changes when only the memory keys change.
    model.zero_grad()
    y, _ = model(x[:, :1], state, no_starts[:, :1])
    y.sum().backward()
    grad_with_memory = model.layers[0].key_value.weight.grad.clone()
    model.zero_grad()
    y, _ = model(x[:, :1], model.initial_state(2), no_starts[:, :1])
    y.sum().backward()
    assert not torch.allclose(grad_with_memory, model.layers[0].key_value.weight.grad)


def influence(model: TransformerXL, length: int, query: int, perturbed: int) -> float:
    """Largest change of the output at ``query`` when the input at ``perturbed`` changes."""
    torch.manual_seed(3)
    x = torch.randn(1, length, INPUT_DIM)
    starts = torch.zeros(1, length, dtype=torch.bool)
    x2 = x.clone()
    x2[0, perturbed] += 1.0
    with torch.no_grad():
        y1, _ = model(x, model.initial_state(1), starts)
        y2, _ = model(x2, model.initial_state(1), starts)
    return (y1[0, query] - y2[0, query]).abs().max().item()


@pytest.mark.parametrize("encoding", POSITIONAL_ENCODINGS)
def test_one_layer_window_is_itself_and_m_predecessors(encoding):
    memory = 5
    model = make_model(num_layers=1, memory_length=memory, positional_encoding=encoding)
    query = 20
    assert influence(model, 25, query, query - memory - 1) == 0.0
    assert influence(model, 25, query, query - memory) > 1e-4
    assert influence(model, 25, query, query + 1) == 0.0  # causal


@pytest.mark.parametrize("encoding", POSITIONAL_ENCODINGS)
def test_receptive_field_of_l_layers_is_l_times_m(encoding):
    layers, memory = 3, 4
    model = make_model(num_layers=layers, memory_length=memory, positional_encoding=encoding)
    query = 30
    assert influence(model, 32, query, query - layers * memory - 1) == 0.0
    assert influence(model, 32, query, query - layers * memory) > 1e-6


@pytest.mark.parametrize("encoding", ["relative", "none", "absolute"])
def test_longer_memory_at_inference_keeps_exactness_and_widens_window(encoding):
    model = make_model(positional_encoding=encoding, memory_length=4, num_layers=1)
    longer = 16
    torch.manual_seed(4)
    x = torch.randn(2, 40, INPUT_DIM)
    starts = torch.rand(2, 40) < 0.05
    with torch.no_grad():
        whole, _ = model(x, model.initial_state(2, memory_length=longer), starts)
        stepped, state = run_steps(model, x, starts, model.initial_state(2, memory_length=longer))
    assert state.memory_length == longer
    assert (whole - stepped).abs().max().item() <= 1e-5

    no_starts = torch.zeros(1, 30, dtype=torch.bool)
    x1, x2 = x[:1, :30], x[:1, :30].clone()
    x2[0, 29 - longer] += 1.0
    with torch.no_grad():
        y1, _ = model(x1, model.initial_state(1, memory_length=longer), no_starts)
        y2, _ = model(x2, model.initial_state(1, memory_length=longer), no_starts)
    assert (y1[0, 29] - y2[0, 29]).abs().max().item() > 1e-4


def test_learned_encoding_refuses_a_different_memory_length():
    model = make_model(positional_encoding="learned", memory_length=4)
    with pytest.raises(ValueError, match="memory_length"):
        model.initial_state(2, memory_length=8)


@pytest.mark.parametrize("fused", [False, True])
def test_stale_key_value_cache_is_rebuilt_after_an_optimizer_step(fused):
    """A non-fused step bumps the parameters' version counters; a fused one does not, so its
    optimizer tells the model (the trainer registers this hook on its own optimizer)."""
    model = make_model(memory_length=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=fused)
    if fused:
        optimizer.register_step_post_hook(lambda *_: model.weights_changed())
    torch.manual_seed(5)
    x = torch.randn(3, 12, INPUT_DIM)
    starts = torch.zeros(3, 12, dtype=torch.bool)
    with torch.no_grad():
        _, state = run_steps(model, x[:, :11], starts[:, :11])
    stale_keys = state.keys

    loss = model(x, model.initial_state(3), starts)[0].square().mean()
    loss.backward()
    optimizer.step()

    with torch.no_grad():
        y_cached, new_state = model.step(x[:, 11], state, starts[:, 11])
        rebuilt = MemoryState(hidden=state.hidden, valid=state.valid,
                              position=state.position, use_cache=False)
        y_rebuilt, _ = model.step(x[:, 11], rebuilt, starts[:, 11])
        # What a stale cache would give: the test would catch it.
        forced = MemoryState(hidden=state.hidden, valid=state.valid, position=state.position,
                             keys=stale_keys, values=state.values, pos_keys=state.pos_keys,
                             cache_tag=model.weights_tag())
        y_stale, _ = model.step(x[:, 11], forced, starts[:, 11])
    assert torch.allclose(y_cached, y_rebuilt, atol=1e-6)
    assert not torch.allclose(y_stale, y_rebuilt, atol=1e-3)
    assert new_state.cache_tag == model.weights_tag()


def test_weights_changed_invalidates_the_cache_of_its_own_model_only():
    """An edit through ``p.data`` bumps no version counter; weights_changed() tells the model,
    and only that model: a copy's cache stays valid."""
    model, other = make_model(seed=0), make_model(seed=0)
    x = torch.randn(2, 5, INPUT_DIM)
    starts = torch.zeros(2, 5, dtype=torch.bool)
    with torch.no_grad():
        _, state = run_steps(model, x[:, :4], starts[:, :4])
        _, other_state = run_steps(other, x[:, :4], starts[:, :4])
        for p in model.parameters():
            p.data.mul_(1.5)
        stale, _ = model.step(x[:, 4], state, starts[:, 4])  # the cache still looks valid
        model.weights_changed()
        y, new_state = model.step(x[:, 4], state, starts[:, 4])
        rebuilt = MemoryState(hidden=state.hidden, valid=state.valid, position=state.position,
                              use_cache=False)
        expected, _ = model.step(x[:, 4], rebuilt, starts[:, 4])
        other_y, other_new = other.step(x[:, 4], other_state, starts[:, 4])
    assert not torch.allclose(stale, expected, atol=1e-3)
    assert torch.allclose(y, expected, atol=1e-6)
    assert new_state.cache_tag == model.weights_tag() != state.cache_tag
    assert other_new.cache_tag == other_state.cache_tag  # its cache was reused


def test_importing_trxl_rl_changes_no_optimizer_of_the_process():
    code = ("import torch.optim.optimizer as o; before = (len(o._global_optimizer_pre_hooks), "
            "len(o._global_optimizer_post_hooks)); import trxl_rl, trxl_rl.train; "
            "after = (len(o._global_optimizer_pre_hooks), len(o._global_optimizer_post_hooks)); "
            "assert before == after, (before, after)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cache_is_also_rebuilt_after_load_state_dict():
    model, other = make_model(seed=0), make_model(seed=1)
    x = torch.randn(2, 6, INPUT_DIM)
    starts = torch.zeros(2, 6, dtype=torch.bool)
    with torch.no_grad():
        _, state = run_steps(model, x[:, :5], starts[:, :5])
        model.load_state_dict(other.state_dict())
        y, _ = model.step(x[:, 5], state, starts[:, 5])
        rebuilt = MemoryState(hidden=state.hidden, valid=state.valid, position=state.position,
                              use_cache=False)
        y_rebuilt, _ = model.step(x[:, 5], rebuilt, starts[:, 5])
    assert torch.allclose(y, y_rebuilt, atol=1e-6)


def test_dtype_and_storage_follow_the_module():
    model = make_model().double()
    x = torch.randn(2, 6, INPUT_DIM, dtype=torch.float64)
    starts = torch.zeros(2, 6, dtype=torch.bool)
    y, state = model(x, model.initial_state(2), starts)
    assert y.dtype == torch.float64 and state.hidden.dtype == torch.float64

    model = make_model()
    x = x.float()
    starts[1, 3] = True
    bf16 = torch.bfloat16
    with torch.no_grad():
        full, _ = run_steps(model, x, starts)
        half, state = run_steps(model, x, starts, model.initial_state(2, dtype=bf16))
        whole, _ = model(x, model.initial_state(2, dtype=bf16), starts)
        split, _ = run_split(model, x, starts, [2, 5], model.initial_state(2, dtype=bf16,
                                                                          kv_cache=False))
    assert state.hidden.dtype == bf16
    assert torch.allclose(full, half, atol=0.1)
    # The lower-precision memory is used consistently: steps, segments and splits agree.
    assert (half - whole).abs().max().item() <= 1e-5
    assert (half - split).abs().max().item() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_and_matches_cpu():
    model = make_model()
    x = torch.randn(2, 20, INPUT_DIM)
    starts = torch.rand(2, 20) < 0.1
    with torch.no_grad():
        cpu, _ = run_steps(model, x, starts)
        model = model.to("cuda")
        gpu, state = run_steps(model, x.cuda(), starts.cuda())
        whole, _ = model(x.cuda(), model.initial_state(2), starts.cuda())
    assert state.hidden.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-4)
    assert (gpu - whole).abs().max().item() <= 1e-5


def test_memory_state_rows_detach_and_to():
    model = make_model()
    x = torch.randn(4, 3, INPUT_DIM)
    _, state = model(x, model.initial_state(4), torch.zeros(4, 3, dtype=torch.bool))
    rows = state[torch.tensor([0, 2])]
    assert rows.batch_size == 2 and rows.hidden.shape == (2, 2, 7, 16)
    assert rows.keys[0].shape == (2, 4, 7, 4)
    assert torch.equal(rows.hidden, state.hidden[[0, 2]])
    assert state.detach().to(dtype=torch.bfloat16).hidden.dtype == torch.bfloat16


def test_memory_state_to_another_dtype_keeps_stepping_as_a_fresh_state_of_that_dtype():
    model = make_model()
    x = torch.randn(2, 7, INPUT_DIM)
    starts = torch.zeros(2, 7, dtype=torch.bool)
    with torch.no_grad():
        _, state = run_steps(model, x[:, :6], starts[:, :6])  # float32, with a cache
        converted = state.to(dtype=torch.bfloat16)
        y, after = model.step(x[:, 6], converted, starts[:, 6])
        uncached = MemoryState(hidden=state.hidden.to(torch.bfloat16), valid=state.valid,
                               position=state.position, use_cache=False)
        expected, _ = model.step(x[:, 6], uncached, starts[:, 6])
    assert converted.keys is None  # the float32 cache does not match bfloat16 storage
    assert after.hidden.dtype == torch.bfloat16
    assert torch.equal(y, expected)
    assert state.to("cpu").keys is not None  # a move keeps the cache


@pytest.mark.parametrize("kwargs,argument", [
    (dict(dim=18, num_heads=4), "dim"),
    (dict(positional_encoding="rotary"), "positional_encoding"),
    (dict(norm="sandwich"), "norm"),
    (dict(memory_length=-1), "memory_length"),
    (dict(num_layers=0), "num_layers"),
    (dict(gating="yes"), "gating"),
])
def test_invalid_config_raises_value_error_naming_the_argument(kwargs, argument):
    base = dict(input_dim=4, dim=16, num_heads=4)
    with pytest.raises(ValueError, match=argument):
        TrXLConfig(**{**base, **kwargs})


def test_invalid_call_arguments_raise_value_error_naming_the_argument():
    model = make_model()
    state = model.initial_state(2)
    starts = torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="x"):
        model(torch.randn(2, 3, INPUT_DIM + 1), state, starts)
    with pytest.raises(ValueError, match="episode_start"):
        model(torch.randn(2, 3, INPUT_DIM), state, starts.float())
    with pytest.raises(ValueError, match="state"):
        model(torch.randn(3, 3, INPUT_DIM), state, torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="episode_start"):
        model.step(torch.randn(2, INPUT_DIM), state, starts)
    with pytest.raises(ValueError, match="batch_size"):
        model.initial_state(0)
    with pytest.raises(ValueError, match="mask"):
        state.reset(torch.ones(3, dtype=torch.bool))


def test_attention_weights_follow_the_transformer_xl_formula():
    """softmax(((q + u).k_j + (q + v).r_{d(i,j)}) / sqrt(Dh)) over visible keys, written out
    independently of the implementation (u, v non-zero; some keys hidden)."""
    layer = make_model(seed=3, positional_encoding="relative").layers[0]
    b, n, m, heads, dh = 2, 3, 4, 4, 4
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(b, n, 16, generator=generator)
    keys = torch.randn(b, heads, m + n, dh, generator=generator)
    pos_keys = torch.randn(m + 1, heads, dh, generator=generator)
    distance = (m + torch.arange(n)[:, None] - torch.arange(m + n)[None, :]).clamp(0, m)
    visible = torch.rand(b, 1, n, m + n, generator=generator) < 0.7
    visible[..., m:] |= torch.eye(n, dtype=torch.bool)  # every query sees itself
    with torch.no_grad():
        weights = layer.attention_weights(h, keys, visible, pos_keys, distance)
        q = layer.query(layer.norm_attn(h)).view(b, n, heads, dh).transpose(1, 2)
        u, v = layer.content_bias, layer.position_bias
        expected = torch.zeros(b, heads, n, m + n)
        for i, j in itertools.product(range(n), range(m + n)):
            content = ((q[:, :, i] + u) * keys[:, :, j]).sum(-1)  # [B, H]
            position = ((q[:, :, i] + v) * pos_keys[distance[i, j]]).sum(-1)
            expected[:, :, i, j] = (content + position) / dh ** 0.5
        expected = expected.masked_fill(~visible, float("-inf")).softmax(-1)
    assert u.abs().min() > 0 and v.abs().min() > 0
    torch.testing.assert_close(weights, expected)


def test_attention_diagnostics_measure_the_entropy_over_the_visible_window():
    """Zero queries score every visible key alike: token t of a fresh episode sees
    min(t + 1, M + 1) keys, so the mean entropy is the mean of their logs; with M = 0 every
    token sees only itself (entropy 0)."""
    torch.manual_seed(0)
    for m in (0, 3):
        trxl = TransformerXL(TrXLConfig(input_dim=5, dim=8, num_layers=2, num_heads=2,
                                        memory_length=m))
        for layer in trxl.layers:
            torch.nn.init.zeros_(layer.query.weight)
            torch.nn.init.zeros_(layer.query.bias)
        starts = torch.zeros(2, 6, dtype=torch.bool)
        starts[:, 0] = True
        stats = trxl.diagnostics(torch.randn(2, 6, 5), trxl.initial_state(2), starts)
        expected = np.mean([np.log(min(t + 1, m + 1)) for t in range(6)])
        for i in (0, 1):
            assert stats[f"attention_entropy_layer{i}"] == pytest.approx(expected, abs=1e-5)
            assert stats[f"attention_max_logit_layer{i}"] == pytest.approx(0.0, abs=1e-6)
