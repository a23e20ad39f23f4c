"""The output folder of a quantize run: its work folder and the checks a resume makes, its temporaries, and its
manifest (written last, by every path that writes a checkpoint: quantize on either path, export).

    OUT/                      the checkpoint, final names only once finished
    OUT/.goldstick-work/      the layer path's work: state.json (the finished layers, the size and sha256 of every
                              work file they left), layer-NNNNN.safetensors / .json, hidden-NNNNN.npz (the
                              inputs of the next layer: one file per layer, so that a kill before the commit
                              leaves the committed one intact); removed at the end
    OUT/.NAME.tmp, .partial   files being written (a killed run may leave some): renamed or removed, never listed

Dot-named entries are the run's own: the manifest lists every other file.
"""

from __future__ import annotations

from pathlib import Path

from goldstick.io.files import sha256_file
from goldstick.io.writer import write_json_atomic

WORK_DIR = ".goldstick-work"
MANIFEST = "manifest.json"


def hidden_name(layer: int) -> str:
    """The work file holding the outputs of ``layer``: the next layer's inputs."""
    return f"hidden-{layer:05d}.npz"


def temporary(path: Path) -> Path:
    """The hidden name a work file is written under before it is renamed to ``path``."""
    return path.with_name(f".{path.name}.tmp{path.suffix}")


def file_record(path: Path) -> dict:
    """What state.json records of a work file: its size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def work_files_problem(work: Path, state: dict) -> str | None:
    """Every work file a finished layer left must be there with the size and sha256 state.json recorded: the first
    one that is not, and why (None when all are)."""
    files = state.get("files", {})
    needed = [f"layer-{i:05d}.{ext}" for i in range(state["finished"] + 1) for ext in ("safetensors", "json")]
    needed += [hidden_name(state["finished"])] if state["finished"] >= 0 else []
    for name in needed:
        path, want = work / name, files.get(name)
        if want is None:
            problem = "is not recorded in state.json"
        elif not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != want["bytes"]:
            problem = f"has {path.stat().st_size} bytes, state.json recorded {want['bytes']} (cut or overwritten)"
        elif sha256_file(path) != want["sha256"]:
            problem = "does not match the sha256 state.json recorded (damaged)"
        else:
            continue
        return f"{path} {problem}"
    return None


def remove_temporaries(out: Path) -> None:
    """Half-written files a killed run left in the output (shard and metadata temporaries, never final names)."""
    for path in out.iterdir():
        if path.is_file() and path.name.startswith(".") and path.name.endswith((".partial", ".tmp")):
            path.unlink(missing_ok=True)


def write_manifest(out: str | Path, known: dict[str, str] | None = None, **extra) -> None:
    """manifest.json, last: sha256 and size of every other file, but those with a dot-named part in their path
    (the work folder, temporaries). ``known``: sha256 the caller already computed, by relative path (the streaming
    path hashes each shard as soon as it is written); ``extra``: more top-level keys, before ``files``."""
    out = Path(out)
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if path.is_file() and path.name != MANIFEST and not any(part.startswith(".") for part in rel.parts):
            files[str(rel)] = {"sha256": (known or {}).get(str(rel)) or sha256_file(path),
                               "bytes": path.stat().st_size}
    write_json_atomic(out / MANIFEST, {"producer": "goldstick", **extra, "files": files})
