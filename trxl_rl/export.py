"""Export a trained policy as one pure step function, its memory an explicit input and output.

    python -m trxl_rl.export runs/<run> --out policy.onnx              # ONNX (onnxruntime)
    python -m trxl_rl.export runs/<run> --out policy.pt                # TorchScript
    python -m trxl_rl.export runs/<run>/checkpoints/update_0000100.pt --format onnx \\
        --out policy.onnx --memory-length 128                          # a longer memory

The exported file computes, for a batch of B environments (any B),

    step(obs..., memory..., episode_start) -> (action parameters..., value, new memory...)

and needs neither trxl_rl nor the environment: ONNX runs in onnxruntime (any language it
has bindings for), TorchScript in ``torch.jit.load`` (Python or C++ libtorch).
``examples/run_exported_policy.py`` runs either in an env loop without importing trxl_rl.

**Inputs**, in this order (names as in the ONNX graph; TorchScript takes them positionally):

- ``obs``: ``[B, *shape]`` in the observation space's dtype (as ``trxl_rl.envs.make_env``
  gives them: MiniGrid grids uint8, images uint8 ``(H, W, C)``, ``Discrete`` int64 ``[B]``);
  a ``Dict`` space gives one input per key, ``obs.<key>`` in sorted key order (nested dicts:
  ``obs.<key>.<key>``).
- ``memory.*``: the backbone's history (:meth:`trxl_rl.memory.MemoryBackbone.history`) of
  each row, K = its ``history_length`` slots, oldest first:

  ==============  ===========================================================================
  backbone        memory tensors
  ==============  ===========================================================================
  trxl, gtrxl     ``memory.valid`` ``[B, M]`` bool (slot holds a step of the current episode),
                  ``memory.hidden`` ``[B, M, L, D]`` float32 (every layer's input at the last
                  M steps), ``memory.position`` ``[B, M]`` int64 (those steps' indices in
                  their episode); with M = 0: ``valid`` and ``position`` ``[B, 1]`` only
  gru, lstm       ``memory.valid`` ``[B, 1]`` bool, ``memory.state`` ``[B, 1, layers, H]``
                  float32 (LSTM: ``[B, 1, layers, 2H]``, h then c)
  none            no memory tensors
  ==============  ===========================================================================

- ``episode_start``: ``[B]`` bool, True where this step is the first of an episode: the
  memory before it is ignored (the row starts afresh).

**Outputs**, in this order: ``logits`` (``Discrete``: ``[B, n]``; ``MultiDiscrete``: ``[B, D,
max(nvec)]``, shorter dimensions padded with probability-0 slots), normalised: they are
log-probabilities; or ``mean`` and ``log_std`` (``Box``: ``[B, *shape]`` each); then
``value`` ``[B]``; then ``new_memory.*``, the memory after this step, the same tensors as
``memory.*``, to feed into the next step.

**Using it.** Start with every memory tensor zero (``valid`` False) and ``episode_start``
True; after each step feed ``new_memory.*`` back and set ``episode_start`` to the env's
``terminated | truncated`` (autoreset). Actions, as the trainer computes them:

- greedy: ``argmax(logits, -1) + start``; ``Box``: ``mean``, clipped to the space's bounds;
- sampled: a categorical draw from ``exp(logits)`` per row (and dimension), ``+ start``;
  ``Box``: ``mean + exp(log_std) * N(0, 1)``, clipped to the bounds before the env sees it;
- log-probability: ``logits[action - start]`` (summed over MultiDiscrete dimensions); ``Box``:
  ``sum(-((a - mean) / std)^2 / 2 - log_std - log(2 pi) / 2)`` of the unclipped sample.

``start`` (0 unless the space says otherwise), the spaces, the tensors' names, shapes and
dtypes, and the env id the policy was trained on are in the file's metadata as JSON
(:func:`read_spec`; ONNX: the model's metadata key ``trxl_rl``, TorchScript: the extra file
``trxl_rl.json``).

Every export is checked before it is written: the file, loaded back, steps a batch of
random observations (another batch size than the trace's, with episode starts) through a
few steps and must agree with the eager agent to 1e-4.

This module imports no trainer and no environment (``checkpoint``, ``agents`` only).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn

from trxl_rl.agents import MemoryAgent
from trxl_rl.agents.distributions import CategoricalDistribution, GaussianDistribution
from trxl_rl.agents.encoders import NatureCNNEncoder
from trxl_rl.agents.observations import obs_to_tensor
from trxl_rl.checkpoint import (
    CheckpointError,
    config_from_checkpoint,
    load_agent,
    space_to_dict,
)
from trxl_rl.memory import MemoryState

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
SPEC_VERSION = 1
ONNX_METADATA_KEY = "trxl_rl"
TORCHSCRIPT_SPEC_FILE = "trxl_rl.json"
EXPORT_EXTRA = 'pip install -e ".[export]"  (or pip install "trxl_rl[export]")'
_TRACE_BATCH, _CHECK_BATCH, _CHECK_STEPS = 2, 3, 4
_CHECK_TOLERANCE = 1e-4


class ExportError(ValueError):
    """An export that cannot be made as asked; the message is one line."""


def _obs_paths(space: spaces.Space, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Key paths of the observation tensors, sorted (``[()]`` for a single tensor)."""
    if isinstance(space, spaces.Dict):
        return [path for key in sorted(space.spaces)
                for path in _obs_paths(space.spaces[key], (*prefix, key))]
    return [prefix]


def sample_observations(space: spaces.Space, batch: int, generator: np.random.Generator):
    """``batch`` random observations of ``space``, batched as a vector env batches them
    (numpy; a dict of arrays for ``Dict`` spaces)."""
    if isinstance(space, spaces.Dict):
        return {key: sample_observations(sub, batch, generator)
                for key, sub in space.spaces.items()}
    space = copy.deepcopy(space)
    space.seed(int(generator.integers(2**31)))
    return np.stack([np.asarray(space.sample()) for _ in range(batch)])


class PolicyStep(nn.Module):
    """One step of a :class:`~trxl_rl.agents.MemoryAgent` as a function of tensors only
    (the layout in the module docstring), ready for ``torch.jit.trace`` and
    ``torch.onnx.export``.

    :param agent: the trained agent (copied: image encoders run on every image, since
        finding repeats is a data-dependent branch a traced graph cannot hold).
    :param memory_length: run a Transformer-XL with this memory length (None: as trained).
    """

    def __init__(self, agent: MemoryAgent, memory_length: int | None = None) -> None:
        super().__init__()
        self.agent = copy.deepcopy(agent).cpu().float().eval().requires_grad_(False)
        for module in self.agent.modules():
            if isinstance(module, NatureCNNEncoder):
                module.dedupe = False
        self.state_options = {} if memory_length is None else {"memory_length": memory_length}
        self.obs_paths = _obs_paths(agent.observation_space)
        records, valid = self.agent.memory.history(self._initial_state(1))
        memory = {"valid": valid, **{name: records[name] for name in sorted(records)}}
        # Tensors with no element (no memory at all) are rebuilt inside, not passed around.
        self.memory_shapes = {name: (tuple(t.shape[1:]), t.dtype) for name, t in memory.items()}
        self.memory_names = [name for name, t in memory.items() if t[0].numel()]
        self.dist_names = ["mean", "log_std"] if isinstance(agent.action_space, spaces.Box) \
            else ["logits"]

    def _initial_state(self, batch: int) -> Any:
        return self.agent.initial_state(batch, **self.state_options)

    @property
    def input_names(self) -> list[str]:
        obs = [".".join(("obs", *path)) for path in self.obs_paths]
        return [*obs, *(f"memory.{n}" for n in self.memory_names), "episode_start"]

    @property
    def output_names(self) -> list[str]:
        return [*self.dist_names, "value", *(f"new_memory.{n}" for n in self.memory_names)]

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        """``(obs..., memory..., episode_start)`` -> ``(action parameters..., value,
        new memory...)``, as listed by :attr:`input_names` and :attr:`output_names`."""
        n_obs = len(self.obs_paths)
        episode_start = inputs[-1]  # [B]
        obs: Any = {}
        for path, tensor in zip(self.obs_paths, inputs[:n_obs], strict=True):
            if not path:
                obs = tensor
                break
            node = obs
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = tensor
        given = dict(zip(self.memory_names, inputs[n_obs:-1], strict=True))
        memory = {name: given[name] if name in given else
                  torch.zeros(episode_start.shape[0], *shape, dtype=dtype)
                  for name, (shape, dtype) in self.memory_shapes.items()}
        valid = memory.pop("valid")
        state = self.agent.memory.state_from_history(memory, valid)
        if isinstance(state, MemoryState):  # no key/value cache: its tag is Python, not graph
            state = dataclasses.replace(state, use_cache=False)
        dist, value, state = self.agent.step(obs, state, episode_start)
        if isinstance(dist, GaussianDistribution):
            params = (dist.mean, dist.log_std)
        elif isinstance(dist, CategoricalDistribution):
            params = (dist.log_probs,)
        else:
            raise ExportError(f"cannot export the action distribution {type(dist).__name__}")
        records, valid = self.agent.memory.history(state)
        new_memory = {"valid": valid, **records}
        return (*params, value, *(new_memory[name] for name in self.memory_names))

    def example_inputs(self, batch: int, seed: int = 0, episode_start: bool = True
                       ) -> tuple[Tensor, ...]:
        """Random observations, the initial memory and ``episode_start`` for ``batch`` rows."""
        sampled = sample_observations(self.agent.observation_space, batch,
                                      np.random.default_rng(seed))
        obs = obs_to_tensor(sampled, torch.device("cpu"))
        flat = []
        for path in self.obs_paths:
            node = obs
            for key in path:
                node = node[key]
            flat.append(node)
        records, valid = self.agent.memory.history(self._initial_state(batch))
        memory = {"valid": valid, **records}
        starts = torch.full((batch,), episode_start, dtype=torch.bool)
        return (*flat, *(memory[name] for name in self.memory_names), starts)


def _describe(tensor: Tensor) -> dict:
    return {"shape": ["B", *tensor.shape[1:]], "dtype": str(tensor.dtype).removeprefix("torch.")}


def policy_spec(step: PolicyStep, checkpoint: dict) -> dict:
    """What a caller of the exported file needs: tensors (names, shapes with ``"B"`` for the
    batch, dtypes), spaces, action ``start``, and where the policy comes from."""
    cfg = config_from_checkpoint(checkpoint)
    example = step.example_inputs(_TRACE_BATCH)
    with torch.no_grad():
        outputs = step(*example)
    action_space = step.agent.action_space
    start = np.asarray(getattr(action_space, "start", 0)).tolist()
    memory = getattr(step.agent.memory, "config", None)
    return {
        "trxl_rl_export": SPEC_VERSION,
        "env_id": cfg.env.id,
        "env_kwargs": cfg.env.kwargs,
        "backbone": cfg.model.backbone,
        "memory_length": step.state_options.get(
            "memory_length", getattr(memory, "memory_length", None)),
        "checkpoint": checkpoint["path"],
        "global_step": checkpoint["counters"]["global_step"],
        "observation_space": space_to_dict(step.agent.observation_space),
        "action_space": space_to_dict(action_space),
        "action": {"distribution": "gaussian" if step.dist_names == ["mean", "log_std"]
                   else "categorical", "start": start},
        "inputs": [{"name": name, **_describe(t)}
                   for name, t in zip(step.input_names, example, strict=True)],
        "outputs": [{"name": name, **_describe(t)}
                    for name, t in zip(step.output_names, outputs, strict=True)],
        "memory": [{"input": f"memory.{n}", "output": f"new_memory.{n}"}
                   for n in step.memory_names],
    }


def _check_packages(fmt: str) -> None:
    if fmt != "onnx":
        return
    import importlib.util
    import inspect

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"--format onnx needs the package{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(missing)}: {EXPORT_EXTRA}")
    if "dynamic_shapes" not in inspect.signature(torch.onnx.export).parameters:
        raise ExportError(f"--format onnx needs torch's torch.export-based ONNX exporter "
                          f"(torch >= 2.6; tested with 2.13), this is torch {torch.__version__}; "
                          f"upgrade torch or export --format torchscript")


def _trace_torchscript(step: PolicyStep, spec: dict) -> bytes:
    example = step.example_inputs(_TRACE_BATCH)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # Shape checks that become constants: the export check below runs another batch size.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch.jit is deprecated (torch 2.13 warns) but still what C++ libtorch and many
        # deployments load; ONNX is the format with a future.
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(step, example, check_trace=False)
        torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_SPEC_FILE: json.dumps(spec)})
    return buffer.getvalue()


def _export_onnx(step: PolicyStep, spec: dict) -> bytes:
    example = step.example_inputs(_TRACE_BATCH)
    batch = torch.export.Dim("batch")
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # notes such as "torchvision is not installed"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # the exporter's progress notes and deprecations
            program = torch.onnx.export(
                step, example, input_names=step.input_names, output_names=step.output_names,
                dynamic_shapes=(tuple({0: batch} for _ in example),), dynamo=True,
                external_data=False, verbose=False)
    finally:
        exporter_log.setLevel(level)
    program.model.metadata_props[ONNX_METADATA_KEY] = json.dumps(spec)
    import onnx_ir

    return onnx_ir.to_proto(program.model).SerializeToString()


def exported_runner(data: bytes, fmt: str):
    """``run(inputs: list[np.ndarray]) -> list[np.ndarray]`` for an exported file's bytes
    (onnxruntime with one thread, or TorchScript)."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda inputs: session.run(None, dict(zip(names, inputs, strict=True)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit, see above
        module = torch.jit.load(io.BytesIO(data))

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in module(*(torch.from_numpy(x) for x in inputs))]
    return run


def check_export(step: PolicyStep, data: bytes, fmt: str) -> float:
    """Step the exported file and the eager agent through :data:`_CHECK_STEPS` steps of
    random observations for :data:`_CHECK_BATCH` rows (some starting episodes at every
    step), the file's memory fed back into itself; the largest difference of any output.

    :raises ExportError: a difference above :data:`_CHECK_TOLERANCE`.
    """
    run = exported_runner(data, fmt)
    n_obs, n_memory = len(step.obs_paths), len(step.memory_names)
    n_dist = len(step.dist_names)
    inputs = step.example_inputs(_CHECK_BATCH, seed=1)
    eager_memory = exported_memory = [t.numpy() for t in inputs[n_obs:n_obs + n_memory]]
    worst = 0.0
    for t in range(_CHECK_STEPS):
        fresh = step.example_inputs(_CHECK_BATCH, seed=2 + t, episode_start=False)
        obs = [x.numpy() for x in fresh[:n_obs]]
        starts = (np.arange(_CHECK_BATCH) == t % _CHECK_BATCH) | (t == 0)
        with torch.no_grad():
            eager = [x.numpy() for x in step(*(torch.from_numpy(x) for x in
                                               (*obs, *eager_memory, starts)))]
        got = run([*obs, *exported_memory, starts])
        for name, a, b in zip(step.output_names, eager, got, strict=True):
            if a.shape != b.shape:
                raise ExportError(f"the exported {fmt} step gives {name} of shape {b.shape}, "
                                  f"the agent {a.shape}")
            if a.size and a.dtype != np.bool_:
                worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()))
            elif a.size and not np.array_equal(a, b):
                worst = max(worst, float("inf"))
        eager_memory, exported_memory = eager[n_dist + 1:], got[n_dist + 1:]
    if worst > _CHECK_TOLERANCE:
        raise ExportError(f"the exported {fmt} step differs from the agent by {worst:.3g} "
                          f"(> {_CHECK_TOLERANCE}); please report this with the checkpoint")
    return worst


def export_policy(source: str | Path, out: str | Path, fmt: str | None = None,
                  memory_length: int | None = None) -> dict:
    """Export the policy of a checkpoint file or run directory (its newest checkpoint).

    :param out: the file to write (atomically: a failed export leaves an existing one as it
        was).
    :param fmt: ``"onnx"`` or ``"torchscript"``; None: from ``out``'s suffix (``.onnx``;
        ``.pt``, ``.ts``).
    :param memory_length: run a Transformer-XL with this memory length (a model trained with
        M runs with a longer one; not with ``positional_encoding: learned``).
    :return: the spec written into the file (see :func:`read_spec`), plus ``check_error``,
        the largest difference the export check measured.
    :raises ExportError, CheckpointError: bad arguments, a missing or unreadable checkpoint,
        a missing optional package; one-line messages.
    """
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {str(out)!r} is a directory; give a file name")
    fmt = fmt or {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}.get(out.suffix)
    if fmt is None:
        raise ExportError(f"cannot tell the format from {str(out)!r}: give --format "
                          f"{' or '.join(FORMATS)} (or end --out in .onnx or .pt)")
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _check_packages(fmt)
    from trxl_rl.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(source, map_location="cpu")
    agent = load_agent(checkpoint["path"])
    if memory_length is not None:
        from trxl_rl.memory import TransformerXL

        if not isinstance(agent.memory, TransformerXL):
            raise ExportError(f"--memory-length applies to Transformer-XL backbones (trxl, "
                              f"gtrxl); this agent's backbone is "
                              f"{agent.train_config.model.backbone!r}")
        try:
            agent.initial_state(1, memory_length=memory_length)
        except ValueError as err:
            raise ExportError(f"--memory-length {memory_length}: {err}") from None
    step = PolicyStep(agent, memory_length)
    spec = policy_spec(step, checkpoint)
    data = (_export_onnx if fmt == "onnx" else _trace_torchscript)(step, spec)
    error = check_export(step, data, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {**spec, "check_error": error}


def read_spec(path: str | Path) -> dict:
    """The spec (tensors, spaces, action ``start``, origin) of an exported file."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return json.loads({p.key: p.value for p in model.metadata_props}[ONNX_METADATA_KEY])
    extra = {TORCHSCRIPT_SPEC_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit, see above
        torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra[TORCHSCRIPT_SPEC_FILE])


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints its usage too)
        print(f"error: {message} (see python -m trxl_rl.export --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m trxl_rl.export",
        description="Export a trained policy's step (observation, memory, episode start -> "
                    "action parameters, value, new memory) to ONNX or TorchScript.")
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="checkpoint file, or run directory (its newest checkpoint)")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE",
                        help="the file to write (.onnx or .pt)")
    parser.add_argument("--format", help="onnx or torchscript (default: from --out's suffix)")
    parser.add_argument("--memory-length", type=int, metavar="M",
                        help="Transformer-XL memory length of the exported step (default: as "
                             "trained; longer works for relative, absolute and none encodings)")
    args = parser.parse_args(argv)
    if args.memory_length is not None and args.memory_length < 0:
        parser.error(f"--memory-length must be >= 0, got {args.memory_length}")
    try:
        spec = export_policy(args.source, args.out, args.format, args.memory_length)
    except (ExportError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    memory = ", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in spec["inputs"]
                       if i["name"].startswith("memory.")) or "none"
    print(f"wrote {args.out} ({spec['backbone']}, memory: {memory}; checked against the agent: "
          f"max difference {spec['check_error']:.2g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
