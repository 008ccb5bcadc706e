"""Observation encoders and action heads: chosen from gymnasium spaces, shapes, dtypes, maths."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gymnasium import spaces

from trxl_rl import TransformerXL, TrXLConfig
from trxl_rl.agents.distributions import (
    CategoricalHead,
    MultiCategoricalHead,
    action_dtype,
    action_shape,
    make_action_head,
)
from trxl_rl.agents.encoders import (
    DictEncoder,
    GridEmbeddingEncoder,
    MLPEncoder,
    NatureCNNDecoder,
    NatureCNNEncoder,
    distinct_rows,
    make_encoder,
)

B = 4

# MiniGrid's (object, colour, state) grid with its true per-channel highs.
SYMBOLIC_GRID = spaces.Box(
    low=0, high=np.broadcast_to(np.array([10, 5, 2], dtype=np.uint8), (3, 3, 3)), dtype=np.uint8
)
IMAGE = spaces.Box(0, 255, (84, 84, 3), np.uint8)
VECTOR = spaces.Box(-1.0, 1.0, (5,), np.float32)


def batch(space: spaces.Space, size: int = B):
    """``size`` samples of ``space`` stacked into tensors in the space's dtype."""
    samples = [space.sample() for _ in range(size)]
    if isinstance(space, spaces.Dict):
        return {key: torch.as_tensor(np.stack([s[key] for s in samples])) for key in space}
    return torch.as_tensor(np.stack(samples))


@pytest.mark.parametrize(
    ("space", "encoder_type", "output_dim"),
    [
        (SYMBOLIC_GRID, GridEmbeddingEncoder, 256),
        (IMAGE, NatureCNNEncoder, 512),
        (VECTOR, MLPEncoder, 64),
        (spaces.Box(0, 9, (7,), np.int64), MLPEncoder, 64),
        (spaces.Discrete(6), MLPEncoder, 64),
        (spaces.MultiBinary(4), MLPEncoder, 64),
        (spaces.Dict({"vector": VECTOR, "image": IMAGE}), DictEncoder, 512 + 64),
    ],
    ids=["symbolic-grid", "image", "vector", "int-vector", "discrete", "multibinary", "dict"],
)
def test_space_selects_encoder_with_float_features_of_output_dim(space, encoder_type, output_dim):
    encoder = make_encoder(space)
    assert type(encoder) is encoder_type
    assert encoder.output_dim == output_dim
    features = encoder(batch(space))
    assert features.shape == (B, output_dim)
    assert features.dtype == torch.float32


def test_out_dim_overrides_the_default_feature_size():
    assert make_encoder(SYMBOLIC_GRID, out_dim=32)(batch(SYMBOLIC_GRID)).shape == (B, 32)
    assert make_encoder(VECTOR, out_dim=16)(batch(VECTOR)).shape == (B, 16)


def test_grid_encoder_embeds_each_channel_with_its_own_high_plus_one_rows():
    encoder = GridEmbeddingEncoder(SYMBOLIC_GRID, embed_dim=4)
    assert encoder.embedding.num_embeddings == 11 + 6 + 3
    assert encoder.offsets.tolist() == [0, 11, 17]
    # A cell (object 2, colour 2, state 2) reads rows 2, 11 + 2 and 17 + 2 of the table.
    cells = torch.full((1, 3, 3, 3), 2, dtype=torch.uint8)
    rows = encoder.embedding.weight[[2, 13, 19]].flatten()  # [C * embed_dim]
    flat = rows.repeat(9)  # every cell alike
    with torch.no_grad():
        expected = torch.relu(encoder.linear(flat) + encoder.pooled(rows))
    torch.testing.assert_close(encoder(cells)[0], expected)


def test_grid_encoder_accepts_the_highest_declared_value_of_every_channel():
    obs = torch.as_tensor(SYMBOLIC_GRID.high).unsqueeze(0)  # (1, 3, 3, 3) uint8
    assert make_encoder(SYMBOLIC_GRID)(obs).shape == (1, 256)


@pytest.mark.parametrize(("channel", "value"), [(0, 11), (1, 6), (2, -1)])
def test_grid_encoder_rejects_a_value_outside_its_channel_range(channel, value):
    obs = torch.zeros(1, 3, 3, 3, dtype=torch.int64)
    obs[0, 1, 1, channel] = value
    with pytest.raises(ValueError, match=rf"channel {channel} .*per-channel high \[10, 5, 2\]"):
        make_encoder(SYMBOLIC_GRID)(obs)


def test_grid_encoder_loads_weights_saved_with_one_table_per_channel():
    encoder = GridEmbeddingEncoder(SYMBOLIC_GRID, embed_dim=4)
    old_format = {k: v for k, v in encoder.state_dict().items() if k != "embedding.weight"}
    for c, rows in enumerate(encoder.embedding.weight.detach().split([11, 6, 3])):
        old_format[f"embeddings.{c}.weight"] = rows.clone()
    loaded = GridEmbeddingEncoder(SYMBOLIC_GRID, embed_dim=4)
    loaded.load_state_dict(old_format)
    obs = batch(SYMBOLIC_GRID)
    torch.testing.assert_close(loaded(obs), encoder(obs))


def test_grid_encoder_recognises_an_object_wherever_it_is_in_view():
    """The max-over-cells term: with the flattened (what-is-where) map zeroed, a key in one
    corner of an empty view and a key in the opposite corner give equal features, a ball does
    not; with the flattened map (the default), where the key is also matters."""
    torch.manual_seed(0)
    encoder = make_encoder(SYMBOLIC_GRID, out_dim=16)
    empty = torch.zeros(1, 3, 3, 3, dtype=torch.uint8)
    empty[..., 0] = 1  # MiniGrid: object type 1 = empty cell
    key_here, key_there, ball = empty.clone(), empty.clone(), empty.clone()
    key_here[0, 0, 0] = torch.tensor([5, 1, 0])  # key, green
    key_there[0, 2, 2] = torch.tensor([5, 1, 0])
    ball[0, 2, 2] = torch.tensor([6, 1, 0])
    assert not torch.allclose(encoder(key_here), encoder(key_there))
    with torch.no_grad():
        encoder.linear.weight.zero_()
        encoder.linear.bias.zero_()
    torch.testing.assert_close(encoder(key_here), encoder(key_there))
    assert not torch.allclose(encoder(key_there), encoder(ball))


def test_image_encoder_is_the_nature_cnn_and_takes_uint8_hwc():
    encoder = make_encoder(IMAGE)
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (32, (8, 8), (4, 4)), (64, (4, 4), (2, 2)), (64, (3, 3), (1, 1))
    ]
    assert encoder.linear.in_features == 64 * 7 * 7
    obs = batch(IMAGE)
    assert obs.dtype == torch.uint8
    # Scaling by 1/255 happens inside: a float copy of the same pixels gives the same features.
    torch.testing.assert_close(encoder(obs), encoder(obs.float()))


def square_image(row: int, col: int, colour=(255, 0, 0)) -> torch.Tensor:
    """A black 84x84 RGB image ``[1, 84, 84, 3]`` with an 8 px square at ``(row, col)``."""
    image = torch.zeros(1, 84, 84, 3, dtype=torch.uint8)
    image[0, row:row + 8, col:col + 8] = torch.tensor(colour, dtype=torch.uint8)
    return image


def test_image_encoder_max_pool_recognises_an_object_wherever_it_is_in_view():
    """The max-over-positions term: with the flattened (what-is-where) map zeroed, a square
    moved by the CNN's stride (8 px), every window of the last convolution that sees it
    inside the image in both places, gives equal features; a square of another colour does
    not; with the flattened map kept, where the square is also matters. Off by default,
    with the published Nature CNN's parameters (state-dict keys) only."""
    torch.manual_seed(0)
    encoder = make_encoder(IMAGE, out_dim=16, max_pool=True)
    here, there = square_image(40, 48), square_image(48, 40)
    green = square_image(48, 40, colour=(0, 255, 0))
    assert not torch.allclose(encoder(here), encoder(there))
    (encoder(here) - encoder(green)).pow(2).sum().backward()
    assert encoder.pooled.weight.grad.abs().sum() > 0
    with torch.no_grad():
        encoder.linear.weight.zero_()
        encoder.linear.bias.zero_()
    torch.testing.assert_close(encoder(here), encoder(there))
    assert not torch.allclose(encoder(there), encoder(green))
    published = make_encoder(IMAGE)
    assert published.pooled is None
    assert set(published.state_dict()) == {f"{part}.{kind}" for part in
                                           ("cnn.0", "cnn.2", "cnn.4", "linear")
                                           for kind in ("weight", "bias")}
    assert set(encoder.state_dict()) == set(published.state_dict()) | {"pooled.weight"}


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((84, 84, 3), torch.uint8), ((3, 5, 1), torch.uint8), ((3,), torch.int16),
     ((2, 2), torch.int64), ((4,), torch.float32)],
    ids=["image", "15-bytes", "6-bytes", "int64", "float"],
)
def test_distinct_rows_merges_exactly_the_identical_entries(shape, dtype):
    generator = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 100, (5, *shape), generator=generator).to(dtype)
    pool[1] = pool[0]
    pool[1].view(-1)[-1] += 1  # differs from entry 0 in its last element only
    batch = pool[torch.tensor([0, 1, 2, 0, 3, 2, 0, 4, 1])]
    first, inverse = distinct_rows(batch)
    assert len(first) == 5 and inverse.shape == (9,)
    assert torch.equal(batch[first][inverse], batch)
    # first[k] is the first position holding distinct entry k
    for k, position in enumerate(first.tolist()):
        assert position == (inverse == k).nonzero()[0, 0].item()


@pytest.mark.parametrize(
    "batch",
    [torch.arange(40, dtype=torch.uint8)[1:33].view(4, 8),  # storage offset 1 byte
     torch.arange(12.0).view(3, 4).t(),  # not contiguous
     torch.zeros(0, 3), torch.zeros(1, 5), torch.zeros(3, 0)],
    ids=["misaligned", "transposed", "empty-batch", "one-entry", "empty-entries"],
)
def test_distinct_rows_handles_any_layout_and_size(batch):
    first, inverse = distinct_rows(batch)
    assert torch.equal(batch[first][inverse], batch)
    assert len(first) == len({row.numpy().tobytes() for row in batch})


@pytest.mark.parametrize("max_pool", [False, True])
def test_image_encoder_with_dedupe_computes_the_full_batch_on_distinct_images(max_pool):
    images, env = memory_rgb_frames()
    torch.manual_seed(0)
    # default: dedupe on CPU
    deduped = NatureCNNEncoder(env.observation_space, out_dim=32, max_pool=max_pool)
    full = NatureCNNEncoder(env.observation_space, out_dim=32, dedupe=False, max_pool=max_pool)
    full.load_state_dict(deduped.state_dict())
    cnn_batch_sizes = []
    deduped.cnn.register_forward_hook(lambda m, inputs, out: cnn_batch_sizes.append(len(out)))
    weights = torch.randn(len(images), 32)
    for encoder in (deduped, full):
        (encoder(images) * weights).sum().backward()
    assert cnn_batch_sizes == [len(distinct_rows(images)[0])] and cnn_batch_sizes[0] < 12
    torch.testing.assert_close(deduped(images), full(images))
    # An input that requires grad gets every row's own gradient (encoded whole).
    pixels = [images.float().requires_grad_() for _ in range(2)]
    for encoder, x in zip((deduped, full), pixels, strict=True):
        (encoder(x) * weights).sum().backward()
    assert torch.equal(pixels[0].grad, pixels[1].grad) and pixels[0].grad[-1].abs().sum() > 0
    # Repeats' gradients are summed in another order: equal up to float32 rounding of the sum.
    for a, b in zip(deduped.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * b.grad.abs().max())


def test_image_encoder_without_grad_looks_up_the_images_it_has_seen_since_its_weights_changed():
    images, env = memory_rgb_frames()
    torch.manual_seed(0)
    encoder = NatureCNNEncoder(env.observation_space, out_dim=32)
    cnn_batch_sizes = []
    encoder.cnn.register_forward_hook(lambda m, inputs, out: cnn_batch_sizes.append(len(out)))
    distinct = len(distinct_rows(images)[0])
    with torch.no_grad():
        first = encoder(images[:8])
        seen = len(distinct_rows(images[:8])[0])
        again = torch.cat([encoder(images[i:i + 4]) for i in range(0, len(images), 4)])
        full = encoder.encode_all(images)
    # Each distinct image went through the CNN once; the later calls found the rest.
    assert sum(cnn_batch_sizes[:-1]) == distinct and cnn_batch_sizes[0] == seen
    torch.testing.assert_close(first, full[:8])
    torch.testing.assert_close(again, full)

    # A step through autograd-visible ops (a plain optimizer) is noticed by version counters.
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    encoder(images).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), encoder.encode_all(images))
        assert not torch.allclose(encoder(images), full)
        # An edit through .data is not: weights_changed() drops the memo.
        old = encoder(images)
        encoder.linear.weight.data.mul_(2.0)
        assert torch.equal(encoder(images), old)
        encoder.weights_changed()
        torch.testing.assert_close(encoder(images), encoder.encode_all(images))


def test_the_agents_weights_changed_reaches_its_image_encoder_and_the_memo_stays_bounded(
        monkeypatch):
    from trxl_rl.agents import MemoryAgent

    images, env = memory_rgb_frames()
    def memory(input_dim):
        return TransformerXL(TrXLConfig(input_dim=input_dim, dim=16, num_layers=1, num_heads=2,
                                        memory_length=4))
    agent = MemoryAgent(env.observation_space, env.action_space, memory, encoder_dim=16)
    monkeypatch.setattr(NatureCNNEncoder, "MEMO_SIZE", 5)
    with torch.no_grad():
        for i in range(len(images)):
            agent.encoder(images[i:i + 1])
            assert len(agent.encoder._memo) <= 5
        before = agent.encoder(images)
        for p in agent.encoder.parameters():
            p.data.add_(0.1)
        agent.weights_changed()
        after = agent.encoder(images)
    torch.testing.assert_close(after, agent.encoder.encode_all(images))
    assert not torch.allclose(before, after)
    # Without dedupe nothing is kept.
    plain = NatureCNNEncoder(env.observation_space, out_dim=16, dedupe=False)
    with torch.no_grad():
        plain(images)
    assert not plain._memo


def memory_rgb_frames():
    """Real MiniGrid-MemoryS9 RGB frames ``[19, 84, 84, 3]`` with repeats, and the env."""
    from trxl_rl.envs import make_env

    env = make_env("MiniGrid-MemoryS9-v0", obs="rgb")
    obs, _ = env.reset(seed=0)
    frames = [obs]
    for action in [0, 0, 2, 1, 1, 2, 2, 0, 0, 1, 2, 2]:  # turn round, walk into the corridor
        obs, *_ = env.step(action)
        frames.append(obs)
    return torch.as_tensor(np.stack(frames + frames[::2])), env


@pytest.mark.parametrize("shape", [(84, 84, 3), (36, 36, 1), (85, 91, 3), (40, 64, 4)])
def test_image_decoder_gives_back_the_encoders_image_shape(shape):
    space = spaces.Box(0, 255, shape, np.uint8)
    decoder = NatureCNNDecoder(space, in_dim=16)
    assert decoder(torch.randn(2, 16)).shape == (2, *shape)


def test_reconstruction_loss_decodes_each_distinct_image_once_and_trains_the_cnn():
    from trxl_rl.agents import MemoryAgent

    images, env = memory_rgb_frames()
    torch.manual_seed(0)
    def memory(input_dim):
        return TransformerXL(TrXLConfig(input_dim=input_dim, dim=32, num_layers=1, num_heads=2,
                                        memory_length=4))
    agent = MemoryAgent(env.observation_space, env.action_space, memory, encoder_dim=32,
                      reconstruction=True)
    decoded_sizes = []
    agent.decoder.register_forward_hook(lambda m, inputs, out: decoded_sizes.append(len(out)))
    segments = images[:18].view(3, 6, 84, 84, 3)  # [C, N, H, W, C], as PPO minibatches are
    loss = agent.reconstruction_loss(segments)
    assert decoded_sizes == [len(distinct_rows(images[:18])[0])] and decoded_sizes[0] < 12
    loss.backward()
    assert agent.encoder.cnn[0].weight.grad.abs().sum() > 0
    assert agent.memory.layers[0].query.weight.grad is None  # the memory is not used
    # A few steps on these frames bring the pixel error well down.
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3)
    first = loss.item()
    for _ in range(30):
        optimizer.zero_grad()
        loss = agent.reconstruction_loss(segments)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    with pytest.raises(RuntimeError, match="no image decoder"):
        MemoryAgent(env.observation_space, env.action_space, memory).reconstruction_loss(images)


def test_reconstruction_needs_an_image_observation_space():
    from trxl_rl.agents import MemoryAgent

    def memory(input_dim):
        return TransformerXL(TrXLConfig(input_dim=input_dim, dim=32, num_layers=1, num_heads=2,
                                        memory_length=4))
    with pytest.raises(ValueError, match="needs an image observation space"):
        MemoryAgent(SYMBOLIC_GRID, spaces.Discrete(3), memory, reconstruction=True)


def test_discrete_observation_is_one_hot_encoded_from_its_start():
    encoder = make_encoder(spaces.Discrete(3, start=-1))
    first_layer = encoder.mlp[0]
    obs = torch.tensor([-1, 0, 1])
    expected = F.relu(first_layer(torch.eye(3)))
    torch.testing.assert_close(encoder.mlp[:2](F.one_hot(obs + 1, 3).float()), expected)
    assert encoder(obs).shape == (3, 64)


@pytest.mark.parametrize(
    "space",
    [SYMBOLIC_GRID, IMAGE, VECTOR, spaces.Discrete(6), spaces.Dict({"v": VECTOR, "i": IMAGE})],
    ids=["symbolic-grid", "image", "vector", "discrete", "dict"],
)
def test_gradient_reaches_every_encoder_parameter(space):
    encoder = make_encoder(space)
    encoder(batch(space, 8)).sum().backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_linear_and_conv_layers_have_orthogonal_weights_and_zero_bias():
    encoder = make_encoder(VECTOR)
    weight = encoder.mlp[2].weight  # square (64, 64): orthogonal * sqrt(2)
    torch.testing.assert_close(weight @ weight.T, 2 * torch.eye(64), atol=1e-5, rtol=0)
    assert all(m.bias.abs().sum() == 0 for m in encoder.mlp if isinstance(m, torch.nn.Linear))


def test_dict_encoder_concatenates_parts_in_sorted_key_order():
    space = spaces.Dict({"z_vector": VECTOR, "a_grid": SYMBOLIC_GRID})
    encoder = make_encoder(space)
    obs = batch(space)
    expected = torch.cat([encoder.parts["a_grid"](obs["a_grid"]),
                          encoder.parts["z_vector"](obs["z_vector"])], dim=-1)
    torch.testing.assert_close(encoder(obs), expected)


@pytest.mark.parametrize(
    "space",
    [
        spaces.Box(0.0, 1.0, (84, 84, 3), np.float32),
        spaces.Box(0.0, 1.0, (4, 4), np.float32),
        spaces.Text(8),
        spaces.Tuple((VECTOR, VECTOR)),
    ],
    ids=["float-image", "2d-box", "text", "tuple"],
)
def test_unsupported_observation_space_error_names_the_space(space):
    with pytest.raises(ValueError, match="supported") as error:
        make_encoder(space)
    assert str(space) in str(error.value)


def test_image_smaller_than_36_pixels_error_names_the_space():
    # Raw MiniGrid declares its symbolic 7x7 grid as a uint8 image with high 255.
    space = spaces.Box(0, 255, (7, 7, 3), np.uint8)
    with pytest.raises(ValueError, match="36") as error:
        make_encoder(space)
    assert str(space) in str(error.value)


# Action heads


def test_discrete_head_samples_int64_actions_of_batch_shape():
    space = spaces.Discrete(3)
    head = make_action_head(space, 8)
    assert isinstance(head, CategoricalHead)
    dist = head(torch.randn(16, 8))
    for actions in (dist.sample(), dist.mode()):
        assert actions.shape == (16,) and actions.dtype == torch.int64
        assert ((actions >= 0) & (actions < 3)).all()
    assert dist.log_prob(dist.sample()).shape == (16,)
    assert dist.entropy().shape == (16,)
    assert action_shape(space) == () and action_dtype(space) == torch.int64


def test_discrete_log_prob_matches_log_softmax_of_the_head_logits():
    head = make_action_head(spaces.Discrete(5), 8)
    features = torch.randn(16, 8)
    actions = torch.randint(0, 5, (16,))
    expected = F.log_softmax(head.logits(features), -1)[torch.arange(16), actions]
    torch.testing.assert_close(head(features).log_prob(actions), expected)


def test_entropy_of_uniform_logits_is_log_n():
    head = make_action_head(spaces.Discrete(7), 8)
    torch.nn.init.zeros_(head.logits.weight)
    torch.testing.assert_close(head(torch.randn(4, 8)).entropy(), torch.full((4,), math.log(7)))


def test_mode_is_the_argmax_of_the_logits():
    head = make_action_head(spaces.Discrete(4), 8)
    features = torch.randn(32, 8)
    assert torch.equal(head(features).mode(), head.logits(features).argmax(-1))


def test_sample_frequencies_match_the_softmax_probabilities():
    head = make_action_head(spaces.Discrete(3), 1)
    with torch.no_grad():
        head.logits.weight.copy_(torch.tensor([[0.0], [1.0], [2.0]]))
    torch.manual_seed(0)
    actions = head(torch.ones(20_000, 1)).sample()
    frequencies = torch.bincount(actions, minlength=3).float() / actions.numel()
    torch.testing.assert_close(frequencies, torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0),
                               atol=0.015, rtol=0)


def test_initial_policy_is_near_uniform():
    dist = make_action_head(spaces.Discrete(3), 64)(torch.randn(16, 64))
    assert (dist.entropy() > math.log(3) - 1e-3).all()


def test_discrete_start_offsets_actions_and_log_prob():
    head = make_action_head(spaces.Discrete(3, start=10), 8)
    features = torch.randn(64, 8)
    dist = head(features)
    actions = dist.sample()
    assert ((actions >= 10) & (actions < 13)).all()
    assert ((dist.mode() >= 10) & (dist.mode() < 13)).all()
    expected = F.log_softmax(head.logits(features), -1)[torch.arange(64), actions - 10]
    torch.testing.assert_close(dist.log_prob(actions), expected)


def test_multidiscrete_samples_one_action_per_dimension():
    space = spaces.MultiDiscrete([3, 5, 2])
    head = make_action_head(space, 8)
    assert isinstance(head, MultiCategoricalHead)
    dist = head(torch.randn(16, 8))
    for actions in (dist.sample(), dist.mode()):
        assert actions.shape == (16, 3) and actions.dtype == torch.int64
        assert (actions >= 0).all() and (actions < torch.tensor([3, 5, 2])).all()
    assert action_shape(space) == (3,) and action_dtype(space) == torch.int64


@pytest.mark.parametrize("nvec", [[3, 5, 2], [4, 4]], ids=["uneven", "even"])
def test_multidiscrete_log_prob_and_entropy_sum_over_dimensions(nvec):
    head = make_action_head(spaces.MultiDiscrete(nvec), 8)
    features = torch.randn(16, 8)
    dist = head(features)
    actions = dist.sample()
    log_probs = [F.log_softmax(part, -1) for part in head.logits(features).split(nvec, -1)]
    expected_log_prob = sum(lp[torch.arange(16), actions[:, d]] for d, lp in enumerate(log_probs))
    expected_entropy = sum(-(lp.exp() * lp).sum(-1) for lp in log_probs)
    torch.testing.assert_close(dist.log_prob(actions), expected_log_prob)
    torch.testing.assert_close(dist.entropy(), expected_entropy)


def test_multidiscrete_uniform_entropy_is_sum_of_log_n_and_padding_never_sampled():
    nvec = [2, 6]
    head = make_action_head(spaces.MultiDiscrete(nvec, start=[1, -3]), 8)
    torch.nn.init.zeros_(head.logits.weight)
    dist = head(torch.randn(1000, 8))
    torch.testing.assert_close(dist.entropy(), torch.full((1000,), math.log(2) + math.log(6)))
    actions = dist.sample()
    assert actions[:, 0].min() == 1 and actions[:, 0].max() == 2
    assert actions[:, 1].min() == -3 and actions[:, 1].max() == 2
    torch.testing.assert_close(dist.log_prob(actions), torch.full((1000,), -math.log(12)))


def test_gradient_flows_from_log_prob_and_entropy_to_the_head():
    head = make_action_head(spaces.MultiDiscrete([3, 5]), 8)
    dist = head(torch.randn(16, 8))
    (dist.log_prob(dist.sample()).sum() + dist.entropy().sum()).backward()
    assert torch.isfinite(head.logits.weight.grad).all()
    assert head.logits.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "space",
    [
        spaces.Tuple((spaces.Discrete(2), spaces.Discrete(3))),
        spaces.MultiBinary(3),
        spaces.MultiDiscrete([[2, 3]]),
    ],
    ids=["tuple", "multibinary", "2d-multidiscrete"],
)
def test_unsupported_action_space_raises_value_error_naming_it(space):
    with pytest.raises(ValueError) as error:
        make_action_head(space, 8)
    assert str(space) in str(error.value)
    with pytest.raises(ValueError):
        action_shape(space)



@pytest.mark.parametrize("dedupe", [None, False])
def test_evaluate_with_reconstruction_is_evaluate_and_reconstruction_with_one_cnn_pass(dedupe):
    from trxl_rl.agents import MemoryAgent

    images, env = memory_rgb_frames()
    segments = images[:18].view(3, 6, 84, 84, 3)
    actions = torch.tensor([[0, 1, 2, 0, 1, 2]] * 3)
    starts = torch.zeros(3, 6, dtype=torch.bool)
    starts[:, 0] = True
    starts[1, 3] = True
    torch.manual_seed(0)

    def memory(input_dim):
        return TransformerXL(TrXLConfig(input_dim=input_dim, dim=32, num_layers=1, num_heads=2,
                                        memory_length=4))
    agent = MemoryAgent(env.observation_space, env.action_space, memory, encoder_dim=32,
                        encoder_dedupe=dedupe, reconstruction=True)
    state = agent.initial_state(3)

    def run(shared):
        agent.zero_grad()
        if shared:
            out, rec = agent.evaluate_with_reconstruction(segments, actions, state, starts)
        else:
            out = agent.evaluate(segments, actions, state, starts)
            rec = agent.reconstruction_loss(segments)
        (out.log_prob.sum() + out.value.sum() + out.entropy.sum() + rec).backward()
        return [out.log_prob, out.value, out.entropy, rec], {
            name: p.grad.clone() for name, p in agent.named_parameters() if p.grad is not None}

    cnn_batches = []
    agent.encoder.cnn.register_forward_hook(lambda m, inputs, out: cnn_batches.append(len(out)))
    apart, grads_apart = run(shared=False)
    assert len(cnn_batches) == 2  # evaluate's pass, then the reconstruction's own
    cnn_batches.clear()
    shared, grads_shared = run(shared=True)
    distinct = len(distinct_rows(images[:18])[0])
    assert cnn_batches == [18 if dedupe is False else distinct] and distinct < 12
    for a, b in zip(apart, shared, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads_apart.keys() == grads_shared.keys()
    for name in grads_apart:
        torch.testing.assert_close(grads_apart[name], grads_shared[name], rtol=1e-4, atol=1e-6,
                                   msg=name)
