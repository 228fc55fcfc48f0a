"""Policy checkpoints: a folder per checkpoint, kept locally and in the object store.

    ck = save_checkpoint(model, tokenizer, home / "runs" / run_id / "ckpt-10", meta, objects=store.objects)
    path = resolve_checkpoint("best", home=home, objects=store.objects)      # or latest, RUN/ckpt-N, a path
    policy = load_checkpoint_policy(path, registry)                          # greedy, as trained

A checkpoint folder holds the model and tokenizer (`save_pretrained`) and `maestro.json`:
run id, name, iteration, registry version, data version, the training config, the curve row
of that iteration (validation accuracy, calls and cost per task) and when it was written.
Every file is also uploaded under `checkpoints/<run_id>/<name>/` of the object store (S3 in
a cluster), so a checkpoint survives the loss of the machine that trained it: resolving a
name downloads it when the local folder is missing.

`ckpt-0` of a run is the untrained policy (the initial weights and the tokenizer), kept so
the evaluation can put the untrained policy beside the trained one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from maestro_core.errors import ConfigError
from maestro_core.objectstore import ObjectStore

META = "maestro.json"
PREFIX = "checkpoints"


@dataclass(frozen=True)
class CheckpointInfo:
    run_id: str
    name: str
    iteration: int
    path: Path | None
    """Local folder (None when only the object store has it)."""
    meta: Mapping[str, Any]

    @property
    def val_accuracy(self) -> float | None:
        v = self.meta.get("metrics", {}).get("val_accuracy")
        return None if v is None else float(v)


def save_weights(model, tokenizer, path: str | Path) -> Path:
    """Write the model and tokenizer files of a checkpoint folder, without maestro.json (its
    presence marks a complete checkpoint): e.g. for a policy server to load them before the
    checkpoint's validation is known. `save_checkpoint(..., weights=False)` completes it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_checkpoint(model, tokenizer, path: str | Path, meta: Mapping[str, Any], *,
                    objects: ObjectStore | None = None, weights: bool = True) -> str:
    """Write the folder (weights, tokenizer, maestro.json), then upload it when `objects` is
    given. `meta` must hold run_id and iteration. `weights=False`: the weights are already
    there (save_weights), only maestro.json is written. Returns the local path."""
    path = Path(path)
    for k in ("run_id", "iteration"):
        if k not in meta:
            raise ConfigError(f"checkpoint metadata lacks '{k}'.", source="save_checkpoint", fix=f"pass meta['{k}'].")
    if weights:
        save_weights(model, tokenizer, path)
    elif not (path / "config.json").exists():
        raise ConfigError(f"{path} has no saved weights.", source="save_checkpoint",
                          fix="call save_weights first, or save with weights=True.")
    full = {"name": path.name, "created": time.time(), **meta}
    (path / META).write_text(json.dumps(full, indent=2, default=str))
    if objects is not None:
        upload(objects, path, str(meta["run_id"]))
    return str(path)


def upload(objects: ObjectStore, path: Path, run_id: str) -> list[str]:
    """Copy a checkpoint folder into the object store (maestro.json last: its presence marks a
    complete upload)."""
    files = sorted((f for f in path.rglob("*") if f.is_file()), key=lambda f: f.name == META)
    keys = []
    for f in files:
        key = f"{PREFIX}/{run_id}/{path.name}/{f.relative_to(path).as_posix()}"
        objects.put_bytes(key, f.read_bytes())
        keys.append(key)
    return keys


def download(objects: ObjectStore, run_id: str, name: str, dest: Path) -> Path:
    prefix = f"{PREFIX}/{run_id}/{name}/"
    keys = objects.list(prefix)
    if f"{prefix}{META}" not in keys:
        raise ConfigError(f"checkpoint {run_id}/{name} is not in the object store {objects.uri(prefix)} "
                          "(or its upload did not finish).", field="--checkpoint",
                          fix="list checkpoints with `maestro runs`, or pass a local checkpoint folder.")
    dest.mkdir(parents=True, exist_ok=True)
    for key in keys:
        target = dest / key[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(objects.get_bytes(key))
    return dest


def _iteration(name: str) -> int:
    try:
        return int(name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _scan(folders, objects: ObjectStore | None, prefix: str, run_of) -> dict[tuple[str, str], CheckpointInfo]:
    found: dict[tuple[str, str], CheckpointInfo] = {}
    for meta_file in folders:
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            continue  # a checkpoint cut mid-write: not listed, never picked
        folder = meta_file.parent
        run = run_of(folder, meta)
        found[(run, folder.name)] = CheckpointInfo(run, folder.name, _iteration(folder.name), folder, meta)
    if objects is not None:
        for key in objects.list(prefix):
            parts = key.split("/")
            if len(parts) != 4 or parts[3] != META or (parts[1], parts[2]) in found:
                continue
            try:
                meta = json.loads(objects.get_bytes(key))
            except ValueError:
                continue
            found[(parts[1], parts[2])] = CheckpointInfo(parts[1], parts[2], _iteration(parts[2]), None, meta)
    return found


def list_checkpoints(home: str | Path, objects: ObjectStore | None = None,
                     run_id: str | None = None) -> list[CheckpointInfo]:
    """Every checkpoint under `<home>/runs/*/ckpt-*` and in the object store (local copies win),
    sorted by (created time, iteration)."""
    folders = sorted((Path(home) / "runs").glob(f"{run_id or '*'}/ckpt-*/{META}"))
    found = _scan(folders, objects, f"{PREFIX}/{run_id}/" if run_id else f"{PREFIX}/",
                  lambda folder, meta: folder.parent.name)
    return sorted(found.values(), key=lambda c: (float(c.meta.get("created", 0)), c.iteration))


def run_checkpoints(out_dir: str | Path, run_id: str, objects: ObjectStore | None = None) -> list[CheckpointInfo]:
    """One run's checkpoints: the folders `<out_dir>/ckpt-*` and the run's copies in the object
    store, by iteration."""
    found = _scan(sorted(Path(out_dir).glob(f"ckpt-*/{META}")), objects, f"{PREFIX}/{run_id}/",
                  lambda folder, meta: run_id)
    return sorted(found.values(), key=lambda c: c.iteration)


def local_copy(info: CheckpointInfo, dest: Path, objects: ObjectStore | None) -> Path:
    """The checkpoint's local folder, downloaded into `dest` when only the object store has it."""
    if info.path is not None:
        return info.path
    if objects is None:
        raise ConfigError(f"checkpoint {info.run_id}/{info.name} has no local copy.", field="--checkpoint",
                          fix="pass the object store that holds it.")
    return download(objects, info.run_id, info.name, dest)


def _local(info: CheckpointInfo, home: Path, objects: ObjectStore | None) -> Path:
    return local_copy(info, home / "runs" / info.run_id / info.name, objects)


def resolve_checkpoint(spec: str, *, home: str | Path, objects: ObjectStore | None = None,
                       run_id: str | None = None) -> Path | None:
    """`none` -> None; `latest` -> the newest checkpoint of the newest run (or of `run_id`);
    `best` -> that run's checkpoint with the highest validation accuracy; `RUN/ckpt-N`;
    or a folder holding a checkpoint. Downloads from the object store when needed."""
    home = Path(home)
    if spec in ("none", ""):
        return None
    if spec in ("latest", "best"):
        all_ck = [c for c in list_checkpoints(home, objects, run_id) if c.iteration > 0]
        if not all_ck:
            raise ConfigError(f"no trained checkpoint found{' for run ' + run_id if run_id else ''} in {home}"
                              f"{' or ' + objects.uri(PREFIX) if objects is not None else ''}.", field="--checkpoint",
                              fix="train one first (maestro train), or use --checkpoint none for the baselines.")
        run = run_id or all_ck[-1].run_id
        mine = [c for c in all_ck if c.run_id == run]
        if spec == "latest":
            pick = max(mine, key=lambda c: c.iteration)
        else:
            scored = [c for c in mine if c.val_accuracy is not None]
            if not scored:
                raise ConfigError(f"run {run} has no validated checkpoint.", field="--checkpoint",
                                  fix="use --checkpoint latest, or train past the first validation.")
            pick = max(scored, key=lambda c: (c.val_accuracy, c.iteration))
        return _local(pick, home, objects)
    p = Path(spec)
    if (p / META).exists() or (p / "config.json").exists():
        return p
    if "/" in spec and not p.is_absolute():
        run, name = spec.split("/", 1)
        hit = [c for c in list_checkpoints(home, objects, run) if c.name == name]
        if hit:
            return _local(hit[0], home, objects)
    raise ConfigError(f"checkpoint '{spec}' not found.", field="--checkpoint",
                      fix="use none, latest, best, RUN_ID/ckpt-N (see `maestro runs`) or a checkpoint folder.")


def read_meta(path: str | Path) -> dict:
    f = Path(path) / META
    return json.loads(f.read_text()) if f.exists() else {}


def untrained_of(path: str | Path, *, home: str | Path, objects: ObjectStore | None = None) -> Path | None:
    """The run's `ckpt-0` (its initial weights) for a trained checkpoint, or None."""
    run = read_meta(path).get("run_id")
    if not run:
        return None
    try:
        return resolve_checkpoint(f"{run}/ckpt-0", home=home, objects=objects)
    except ConfigError:
        return None


def load_checkpoint_policy(path: str | Path, registry, *, temperature: float = 0.0, checkpoint_id: str | None = None,
                           price_tilt: float = 0.0, device: str | None = None):
    """An in-process policy from a checkpoint folder, with the decoding settings it was trained
    with: an LMPolicy, or a VLMPolicy (model + processor) for a checkpoint of a served
    vision-language policy (its run's `policy: {vision: true}`), which then sees the images.
    `price_tilt`: the request-time price tilt (LMPolicy.price_tilt). `device`: where the model
    is placed (default `policy_model.inference_device()`: CUDA when there is one)."""
    from maestro_core.lm_policy import LMPolicy
    from maestro_core.policy_model import inference_device, load_policy_model
    from maestro_core.tokenizer import load_policy_tokenizer
    from maestro_core.training import policy_kwargs

    path = Path(path)
    meta = read_meta(path)
    cfg = meta.get("config", {})
    cid = checkpoint_id or f"{meta.get('run_id', path.parent.name)}/{path.name}"
    if (meta.get("policy") or {}).get("vision"):
        from maestro_core.multimodal import VLMPolicy
        from maestro_core.policy_config import load_learner

        model, processor = load_learner(path, vision=True)
        model = model.to(device or inference_device())
        return VLMPolicy(model, processor, registry, temperature=temperature, **policy_kwargs(cfg, registry),
                         checkpoint_id=cid, price_tilt=price_tilt)
    model = load_policy_model(path, device=device or inference_device())
    tok = load_policy_tokenizer(path)
    return LMPolicy(model, tok, registry, temperature=temperature, **policy_kwargs(cfg, registry), checkpoint_id=cid,
                    price_tilt=price_tilt)
