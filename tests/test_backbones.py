"""Specification of the memory backbones besides the Transformer-XL, and of the interface
(DESIGN.md, "Memory backbones"): step == segment, no leakage across episode starts, and a
history that rebuilds the state exactly."""

import sys
from pathlib import Path

import pytest
import torch

from trxl_rl.backbones import (
    BACKBONES,
    NoMemory,
    RecurrentBackbone,
    RecurrentConfig,
    make_backbone,
    register_backbone,
)
from trxl_rl.memory import TransformerXL

sys.path.insert(0, str(Path(__file__).parent))
from test_memory import run_steps  # noqa: E402  (one token at a time, any backbone)

INPUT_DIM = 6
FIELDS = {"trxl": {"dim": 16, "num_heads": 2, "memory_length": 5},
          "gtrxl": {"dim": 16, "num_heads": 2, "memory_length": 5},
          "gru": {"hidden_size": 12, "num_layers": 2},
          "lstm": {"hidden_size": 12, "num_layers": 2},
          "none": {}}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return make_backbone(name, INPUT_DIM, FIELDS[name]).eval()


def stream(batch: int = 3, steps: int = 23, seed: int = 1):
    """Inputs and random episode starts, at least one inside the stream of every row."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, INPUT_DIM, generator=generator)
    starts = torch.rand(batch, steps, generator=generator) < 0.15
    starts[:, 0] = True
    starts[:, steps // 2] = True
    return x, starts


@pytest.mark.parametrize("name", list(FIELDS))
def test_step_equals_segment_for_any_split_over_episode_starts(name):
    model = make(name)
    x, starts = stream()
    with torch.no_grad():
        stepped, _ = run_steps(model, x, starts)
        for cuts in ([], [1, 2, 3], [5, 11, 17], [7]):
            state, pieces = model.initial_state(3), []
            for begin, end in zip([0, *cuts], [*cuts, x.shape[1]], strict=True):
                y, state = model(x[:, begin:end], state, starts[:, begin:end])
                pieces.append(y)
            assert (torch.cat(pieces, 1) - stepped).abs().max().item() <= 1e-5, cuts


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_no_leakage_across_an_episode_start(name):
    model = make(name)
    x, starts = stream()
    with torch.no_grad():
        y, _ = model(x, model.initial_state(3), starts)
        row, t = 0, int(starts[0, 1:].nonzero()[0, 0]) + 1  # a start inside row 0
        fresh, _ = model(x[row:row + 1, t:], model.initial_state(1), starts[row:row + 1, t:])
        # Without the reset the same tokens would give other outputs.
        carried, _ = model(x[:1], model.initial_state(1), torch.zeros_like(starts[:1]))
    assert (y[row, t:] - fresh[0]).abs().max().item() <= 1e-6
    assert (y[row, t:] - carried[0, t:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", list(FIELDS))
def test_history_rebuilds_the_state_the_rollout_needs(name):
    """A state rebuilt from its history (as checkpoints and minibatches do) computes what the
    state itself computes; each step's record is the newest entry of the next history."""
    model = make(name)
    x, starts = stream(steps=12)
    with torch.no_grad():
        _, state = run_steps(model, x[:, :10], starts[:, :10])
        records, valid = model.history(state)
        k = model.history_length
        assert valid.shape == (3, k)
        for value in records.values():
            assert value.shape[:2] == (3, k)
        rebuilt = model.state_from_history(records, valid)
        expected, _ = run_steps(model, x[:, 10:], starts[:, 10:], state)
        again, _ = run_steps(model, x[:, 10:], starts[:, 10:], rebuilt)
        # Equal up to float rounding: the Transformer-XL's rebuilt state has no key/value cache
        # and projects its stored hidden states again.
        assert (expected - again).abs().max().item() <= 1e-6
        _, after = model.step(x[:, 10], state, starts[:, 10])
        newest = model.step_record(after)
        history_after, _ = model.history(after)
        for key, value in newest.items():
            assert torch.equal(history_after[key][:, -1], value)


def test_recurrent_state_shapes_and_the_lstm_cell_state():
    gru, lstm = make("gru"), make("lstm")
    assert gru.initial_state(4).shape == (4, 2, 12) and gru.output_dim == 12
    assert lstm.initial_state(4).shape == (4, 2, 24)  # h and c
    assert isinstance(lstm.rnn, torch.nn.LSTM) and isinstance(gru.rnn, torch.nn.GRU)
    assert make("none").output_dim == INPUT_DIM and make("none").history_length == 0


def test_gtrxl_is_the_transformer_xl_with_gates():
    gtrxl, trxl = make("gtrxl"), make("trxl")
    assert isinstance(gtrxl, TransformerXL) and gtrxl.config.gating
    assert not trxl.config.gating and trxl.layers[0].gates is None


@pytest.mark.parametrize("name,fields,needle", [
    ("rnn", {}, "unknown backbone 'rnn'"),
    ("gru", {"hidden": 3}, "unknown field 'hidden'"),
    ("gru", {"cell": "lstm"}, "cell is fixed"),
    ("lstm", {"hidden_size": 0}, "hidden_size must be an integer >= 1"),
    ("gtrxl", {"gating": False}, "gating is fixed"),
    ("trxl", {"input_dim": 3}, "input_dim is fixed"),
    ("trxl", {"dim": 10, "num_heads": 3}, "must be divisible by num_heads"),
    ("none", {"hidden_size": 3}, "takes no fields"),
])
def test_bad_backbone_names_and_fields_raise_value_error_naming_them(name, fields, needle):
    with pytest.raises(ValueError, match=needle):
        make_backbone(name, INPUT_DIM, fields)


def test_a_registered_backbone_is_built_by_name():
    def build(input_dim, hidden_size=4):
        return RecurrentBackbone(RecurrentConfig(input_dim, hidden_size))

    register_backbone("tiny_gru_for_test", build)
    try:
        model = make_backbone("tiny_gru_for_test", INPUT_DIM, {"hidden_size": 3})
        assert model.output_dim == 3
        with pytest.raises(ValueError, match="built in"):
            register_backbone("gru", build)
    finally:
        del BACKBONES["tiny_gru_for_test"]


def test_no_memory_passes_the_encoder_features_through():
    model = NoMemory(INPUT_DIM)
    x, starts = stream()
    y, state = model(x, model.initial_state(3), starts)
    assert torch.equal(y, x) and state.shape == (3, 0)
