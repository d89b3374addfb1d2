"""Checkpoint readers that never execute pickled code, and downloads for online users.

Every reader returns a flat `{name: np.ndarray}` dict with the file's own names
('blocks.0.attn.qkv.weight' for PyTorch files, 'Transformer/encoder_norm/scale'
for .npz files) except `read_tljax`, which returns a nested variables tree.

Safety: safetensors and `.npz` (`allow_pickle=False`) hold raw arrays only;
PyTorch files go through `torch.load(weights_only=True)`, whose restricted
unpickler refuses any object other than tensors and plain containers, so a
malicious `__reduce__` payload raises before it can run.

Downloads (HF hub, timm names, `gs://` buckets) first check in a few seconds
that the host is reachable, and otherwise raise `OfflineError` naming the
local-file alternative, instead of retrying for minutes.
"""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import socket
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tljax.errors import InputError, MissingFileError


class OfflineError(InputError, ConnectionError):
    """A download was requested but the host cannot be reached."""


class UnsafeCheckpointError(InputError):
    """A checkpoint would need arbitrary code execution to load."""


class UnreadableCheckpointError(InputError):
    """A checkpoint file is damaged, truncated or not of the format its name says."""


# ---------------------------------------------------------------------------------------------
# Local files.


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a `.safetensors` file as numpy arrays (bfloat16 widened to float32)."""
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise UnreadableCheckpointError(
            f"{path} is not a readable .safetensors file ({e}): it is damaged or truncated, or "
            "another format; download or convert it again.") from e
    except TypeError:  # bfloat16 has no numpy dtype: go through torch when it is there
        torch = _import_torch(path)
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                out[name] = _torch_to_numpy(torch, f.get_tensor(name))
    return out


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an `.npz` file; object arrays (which need pickle) are refused."""
    # np.load reads anything that is neither an .npz (zip) nor an .npy file as a pickle.
    if not zipfile.is_zipfile(path):
        raise UnreadableCheckpointError(
            f"{path} is not an .npz archive (damaged, truncated or another format); download "
            "or convert it again.")
    try:
        with np.load(str(path), allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UnsafeCheckpointError(
                f"{path} contains pickled objects; only plain numeric arrays are read. "
                "Re-save it with numpy arrays only (np.savez(path, **flat_arrays)).") from e
        raise


def _import_torch(path: Any):
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"Reading the PyTorch checkpoint {path} needs PyTorch: `pip install torch` "
            "(the CPU build is enough), or convert the file to .safetensors elsewhere.") from e
    return torch


def _torch_to_numpy(torch: Any, tensor: Any) -> np.ndarray:
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def _flatten_state_dict(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts of tensors -> {'a.b': tensor}; other leaves (ints, strings) are dropped."""
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten_state_dict(value, name + "."))
        elif hasattr(value, "detach"):
            out[name] = value
    return out


def read_torch(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch `.pth`/`.bin`/`.pt` state dict via `torch.load(weights_only=True)`.

    A checkpoint that wraps the state dict (`{'state_dict': ...}`, `{'model': ...}`,
    `{'model_state': ...}`) is unwrapped. Both of torch's formats are read: the zip archive
    and the legacy (pre-1.6) pickle stream, which `weights_only=True` restricts alike.
    Anything needing arbitrary unpickling raises UnsafeCheckpointError.
    """
    torch = _import_torch(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # not an object it refused: bytes it cannot read
            raise UnreadableCheckpointError(
                f"{path} is not a readable PyTorch checkpoint (damaged, truncated or another "
                "format); download or save it again.") from e
        # The restricted unpickler met a global (a class or function) it does not allow.
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: it needs arbitrary code execution to unpickle "
            f"(only tensors and plain containers are allowed). If you trust the file, "
            f"re-save its state_dict() as .safetensors. Details: "
            f"{' '.join(str(e).split())[:300]}") from e
    except (RuntimeError, EOFError) as e:  # a truncated zip archive or pickle stream
        raise UnreadableCheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200]}): "
            "it is damaged or truncated; download or save it again.") from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "model_state"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise UnreadableCheckpointError(f"{path} holds a {type(obj).__name__}, not a state "
                                        "dict of tensors.")
    return {name: _torch_to_numpy(torch, t) for name, t in _flatten_state_dict(obj).items()}


def read_tljax(path: str | os.PathLike, step: int | None = None
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(variables, metadata) of a tljax checkpoint: a converted one or a training workdir."""
    from tljax import checkpoint

    return checkpoint.load_variables(str(path), step=step)


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Dispatch on the file type: .safetensors, .npz, or a PyTorch file (.pth/.pt/.bin)."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"No checkpoint file at {path}.")
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():  # sharded: {"weight_map": {tensor name: shard file}}
            import json

            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in read_safetensors(path / shard).items()}
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                return read_weights(path / name)
        raise MissingFileError(f"{path} is a directory without model.safetensors or "
                                "pytorch_model.bin; pass the weights file itself.")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix == ".npz":
        return read_npz(path)
    if suffix in (".pth", ".pt", ".bin", ".ckpt") or zipfile.is_zipfile(path):
        return read_torch(path)
    raise InputError(f"Unknown checkpoint type {path.name!r}: expected .safetensors, .npz, "
                     ".pth/.pt/.bin (PyTorch) or a tljax checkpoint directory.")


# ---------------------------------------------------------------------------------------------
# Downloads.


def check_online(host: str, port: int = 443, timeout: float = 3.0) -> None:
    """Raises OfflineError unless `host:port` accepts a TCP connection within `timeout` s.

    TLJAX_OFFLINE=1 fails at once. DNS lookups ignore socket timeouts, so the whole
    check runs in a worker thread.
    """
    if os.environ.get("TLJAX_OFFLINE") not in (None, "", "0"):
        raise OfflineError(f"TLJAX_OFFLINE is set: not contacting {host}.")
    def connect():
        with socket.create_connection((host, port), timeout=timeout):
            pass

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(connect).result(timeout=timeout)
    except Exception as e:
        raise OfflineError(f"{host} is not reachable ({type(e).__name__}: {e}).") from e
    finally:
        pool.shutdown(wait=False)


def _offline_error(what: str, host: str, alternative: str) -> OfflineError:
    return OfflineError(f"Cannot download {what}: {host} is not reachable from this machine. "
                        f"Download it where you are online and load the local copy: "
                        f"{alternative}")


def download_hf(repo_id: str, filenames: tuple[str, ...] = ("config.json", "model.safetensors")
                ) -> Path:
    """Files of a Hugging Face hub repo into the local cache; returns the snapshot directory."""
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        raise _offline_error(f"{repo_id!r}", "huggingface.co (HF_HUB_OFFLINE is set)",
                             "load_pretrained('hf:/path/to/dir') with config.json and "
                             "model.safetensors in that directory.")
    try:
        check_online("huggingface.co")
    except OfflineError as e:
        raise _offline_error(f"{repo_id!r}", "huggingface.co",
                             "load_pretrained('hf:/path/to/dir') with config.json and "
                             "model.safetensors in that directory.") from e
    from huggingface_hub import hf_hub_download

    paths = [Path(hf_hub_download(repo_id, name)) for name in filenames]
    return paths[0].parent


def download_timm(model_name: str) -> Path:
    """timm's pretrained weights for `model_name` (e.g. 'vit_base_patch16_224.augreg_in21k')."""
    try:
        check_online("huggingface.co")
    except OfflineError as e:
        raise _offline_error(f"timm weights {model_name!r}", "huggingface.co",
                             f"load_pretrained('timm:{model_name.split('.')[0]}:"
                             "/path/model.safetensors').") from e
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(f"timm/{model_name}", "model.safetensors"))


def download_gcs(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A public `gs://bucket/path` object (big_vision / vit_jax checkpoints) into a local cache."""
    if not url.startswith("gs://"):
        raise ValueError(f"Expected a gs:// URL, got {url!r}.")
    try:
        check_online("storage.googleapis.com")
    except OfflineError as e:
        raise _offline_error(url, "storage.googleapis.com",
                             "`gsutil cp` (or a browser) it where you are online, then "
                             "load_pretrained('big_vision:/path/ckpt.npz').") from e
    cache = Path(cache_dir or os.environ.get("TLJAX_CACHE", Path.home() / ".cache" / "tljax"))
    target = cache / url[len("gs://"):]
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(target.suffix + ".partial")
        urllib.request.urlretrieve("https://storage.googleapis.com/" + url[len("gs://"):], partial)
        partial.rename(target)
    return target
