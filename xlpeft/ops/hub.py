"""Hugging Face Hub: backbones and adapters by repo id, through ``huggingface_hub``'s cache.

    "owner/name" ─► snapshot_download (local_files_only when offline) ─► <cache>/models--owner--name/
                    snapshots/<commit>/ (the commit ``refs/<revision>`` names) ─► a local folder, loaded as one
    push_adapter_to_hub(model, name, "owner/name") ─► save_adapter into a temporary folder
                    ─► HfApi.create_repo(exist_ok=True) + HfApi.upload_folder

The cache and the offline switch are read when called (``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``), so a process that changes its environment is honoured.
A local folder of the same name always wins over the Hub.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xlpeft.errors import MissingDependencyError, XlpeftTypeError, XlpeftValueError

if TYPE_CHECKING:
    from xlpeft.core.model import AdaptedModel

HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token")
"""Keyword arguments that say where a repo's files come from (they never reach ``from_pretrained``)."""
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.spm", "*.tiktoken"]
"""A backbone snapshot: configs, safetensors weights and tokenizer files (no TF/Flax/ONNX copies)."""
_TRUE = {"1", "on", "yes", "true"}


def is_repo_id(name: Any) -> bool:
    """A Hub repo id (``owner/name`` or a legacy ``name``) that is not an existing local path."""
    return (isinstance(name, str) and bool(REPO_ID.fullmatch(name)) and ".." not in name
            and not name.endswith(".") and not Path(name).expanduser().exists())


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set now (or was when huggingface_hub was imported)."""
    from huggingface_hub import constants
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def hub_cache(given: str | os.PathLike | None = None) -> str:
    """The cache folder used: ``given``, else ``HF_HUB_CACHE`` now, else huggingface_hub's default."""
    from huggingface_hub import constants
    return os.fspath(given or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def split_hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the ``HUB_KWARGS`` of ``kwargs``."""
    return {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as err:  # a dependency of transformers, so normally present
        raise MissingDependencyError("loading by Hub repo id needs huggingface_hub: pip install huggingface_hub") from err
    return huggingface_hub


def snapshot(repo_id: str, what: str = "model", revision: str | None = None,
             cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
             token: str | bool | None = None, allow_patterns: list[str] | None = None) -> Path:
    """The local snapshot folder of ``repo_id`` (downloaded, or from the cache when offline)."""
    hub = _hub()
    from huggingface_hub import errors

    where = hub_cache(cache_dir)
    no_network = bool(local_files_only) or offline()
    try:
        folder = hub.snapshot_download(repo_id, revision=revision, cache_dir=where, local_files_only=no_network,
                                       token=token, allow_patterns=allow_patterns)
    except getattr(errors, "IncompleteSnapshotError", ()) as err:  # huggingface_hub ≥ 1.x checks snapshots
        raise XlpeftValueError(f"the cached {what} {repo_id!r} (in {where}) is incomplete and the Hub cannot be "
                               f"reached; download it again online. Cause: {err}") from err
    except errors.LocalEntryNotFoundError as err:
        why = ("offline (HF_HUB_OFFLINE or local_files_only)" if no_network else "the Hub cannot be reached")
        raise XlpeftValueError(
            f"{what} {repo_id!r}{f' at revision {revision!r}' if revision else ''} is no local folder and not in "
            f"the Hugging Face cache at {where}, and xlpeft is {why}; download it once online (`hf download {repo_id}`), point "
            "HF_HUB_CACHE at the cache that holds it, or pass a local folder") from err
    except (errors.RepositoryNotFoundError, errors.GatedRepoError, errors.RevisionNotFoundError) as err:
        raise XlpeftValueError(f"{what} {repo_id!r} is no local folder and cannot be fetched from the Hub "
                               f"({type(err).__name__}): check the path, or the repo id and revision, and log in (`hf auth login`) for private or gated "
                               "repos") from err
    except (errors.HFValidationError, errors.HfHubHTTPError, OSError) as err:
        raise XlpeftValueError(f"{what} {repo_id!r} is no local folder and cannot be fetched from the Hub: {err}") from err
    return Path(folder)


def model_folder(name_or_path: str, kwargs: dict[str, Any]) -> str:
    """A local folder for a backbone repo id (``kwargs`` loses its hub arguments); anything else as given."""
    from xlpeft.backbones.embedded import EMBEDDED_BASE, EMBEDDED_NAMES

    if not is_repo_id(name_or_path) or name_or_path in EMBEDDED_NAMES or name_or_path == EMBEDDED_BASE:
        return name_or_path
    hub = split_hub_kwargs(kwargs)
    folder = snapshot(name_or_path, "backbone", allow_patterns=MODEL_FILES, **hub)
    if not any(folder.glob("*.safetensors")):  # older repos: PyTorch weights only (loaded with weights_only)
        folder = snapshot(name_or_path, "backbone", allow_patterns=["pytorch_model*.bin"], **hub)
    return os.fspath(folder)


def adapter_folder(path: Any, hub: dict[str, Any] | None = None) -> Any:
    """A local folder for an adapter repo id; local paths (and bad values, checked later) as given."""
    unknown = sorted(set(hub or {}) - set(HUB_KWARGS))
    if unknown:
        raise XlpeftTypeError(f"load_adapter's Hub arguments can be {', '.join(HUB_KWARGS)}; got {unknown}")
    if not is_repo_id(path):
        if hub:
            raise XlpeftValueError(f"{', '.join(sorted(hub))} apply to Hub repo ids; {path!r} is a local path")
        return path
    return snapshot(path, "adapter", **(hub or {}))


MODEL_CARD = """---
library_name: xlpeft
tags: [xlpeft, adapter, {method}]
{base}---

# {name}

A `{method}` adapter saved by xlpeft (format `{format}`) for a `{family}` backbone.

```python
from xlpeft import AdaptedModel
model = AdaptedModel.from_pretrained({base_name!r})
model.load_adapter({repo_id!r}, set_active=True)
```
"""


def push_adapter_to_hub(model: AdaptedModel, name: str, repo_id: str, *, format: str = "xlpeft",
                        private: bool | None = None, token: str | None = None, commit_message: str | None = None,
                        revision: str | None = None, create_pr: bool = False) -> Any:
    """Upload adapter ``name`` (as ``save_adapter(format=...)`` writes it, plus a model card) to ``repo_id``."""
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id) or "/" not in repo_id:
        raise XlpeftValueError(f"`repo_id` can be 'owner/name' (letters, digits, '-', '_', '.'); got {repo_id!r}")
    model.require_adapters(name)
    api = _hub().HfApi(token=token)
    base_name = getattr(model.model.config, "_name_or_path", "") or "<backbone>"
    with tempfile.TemporaryDirectory(prefix="xlpeft-push-") as tmp:
        folder = Path(tmp) / name
        model.save_adapter(name, str(folder), format=format)
        card = MODEL_CARD.format(method=model.configs[name].method, name=name, format=format,
                                 family=model.layout.family, base_name=base_name, repo_id=repo_id,
                                 base=f"base_model: {base_name}\n" if is_repo_id(base_name) else "")
        (folder / "README.md").write_text(card, encoding="utf-8")
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or f"Upload xlpeft adapter {name}")
