"""A job's outputs: collected from its folder when it ends, kept with their checksums, read back for FetchOutput.

`<state_dir>/outputs/<job id>/files/<name>` holds copies of the declared paths, and `manifest.json` (written last,
by a rename) lists each file with its SHA-256 and size: a job's outputs are ready exactly when its manifest
exists, so nothing partial is ever served as complete. `pending/<job id>` marks a job whose outputs are still to
be collected (made when the job is accepted): a hub that crashed before collecting does it after its restart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import orjson

from federation.blobs import CHUNK_BYTES, FileReader, FileWriter
from federation.errors import FailedPrecondition, NotFound
from federation.model import InputFile, Job, check_input_name

log = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 10 << 30   # all outputs of one job
MAX_OUTPUT_FILES = 10_000


class Outputs:
    def __init__(self, root: Path, max_bytes: int = MAX_OUTPUT_BYTES, retention_s: int = 30 * 86400,
                 quota_bytes: int = 0):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.retention_s = retention_s  # how long after its job ended collected outputs are kept
        self.quota_bytes = quota_bytes  # all outputs one user (a job's owner) keeps here; 0: no quota
        (self.root / "pending").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # collections and deletions run in worker threads
        self._held: dict[str, int] | None = None  # owner -> bytes of outputs kept here (read from the manifests)

    def held(self, owner: str) -> int:
        """Bytes of collected outputs the user keeps here."""
        with self._lock:
            return self._holdings().get(owner, 0)

    def _holdings(self) -> dict[str, int]:
        """Per owner, from the manifests (read once; kept up to date by collect and forget). Lock held."""
        if self._held is None:
            held: dict[str, int] = {}
            for path in self.root.glob("*/manifest.json"):
                try:
                    manifest = orjson.loads(path.read_bytes())
                except (OSError, orjson.JSONDecodeError):
                    continue
                owner = manifest.get("owner", "")
                held[owner] = held.get(owner, 0) + sum(size for _, _, size in manifest["files"])
            self._held = held
        return self._held

    def _release(self, job_id: str) -> None:
        """Stop counting a job's kept outputs (before they are deleted or collected again). Lock held."""
        try:
            manifest = orjson.loads(self._manifest(job_id).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return
        owner, size = manifest.get("owner", ""), sum(size for _, _, size in manifest["files"])
        held = self._holdings()
        held[owner] = max(0, held.get(owner, 0) - size)

    def expect(self, job_id: str) -> None:
        """The job declares outputs: collect them when it ends, even after a restart."""
        (self.root / "pending" / job_id).touch()

    def collected(self) -> list[str]:
        """The jobs whose outputs are kept here (collected or being collected)."""
        return sorted(p.name for p in self.root.iterdir() if p.name != "pending")

    def collected_at(self, job_id: str) -> float:
        """When the job's outputs were collected (its manifest written); 0 if they were not."""
        try:
            return self._manifest(job_id).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def pending(self) -> list[str]:
        return sorted(p.name for p in (self.root / "pending").iterdir())

    def _manifest(self, job_id: str) -> Path:
        return self.root / job_id / "manifest.json"

    def collect(self, job: Job, folder: Path) -> dict:
        """Copy the job's declared outputs out of `folder` (checksummed), then write the manifest. Paths that are
        missing or lead out of the folder are named in the manifest's error; over the size limit, nothing is
        kept but the error. Runs in a worker thread."""
        target = self.root / job.id
        with self._lock:
            self._release(job.id)  # collected before (a restart in between): counted again below
            self._holdings()
            shutil.rmtree(target, ignore_errors=True)
        files_dir = target / "files"
        files_dir.mkdir(parents=True)
        top = folder.resolve()
        found: list[tuple[str, Path]] = []
        problems: list[str] = []
        for declared in job.spec.outputs:
            path = folder / declared
            if not path.exists() and not path.is_symlink():
                problems.append(f"{declared}: not found")
                continue
            if not path.resolve().is_relative_to(top):
                problems.append(f"{declared}: leads out of the job's folder (not collected)")
                continue
            if path.is_dir():
                for dirpath, dirnames, filenames in os.walk(path):
                    dirnames.sort()
                    for entry in sorted(filenames):
                        local = Path(dirpath, entry)
                        if local.is_symlink() and not local.resolve().is_relative_to(top):
                            problems.append(f"{local.relative_to(folder)}: leads out of the job's folder")
                        elif local.is_file():
                            found.append((str(local.relative_to(folder)), local))
            elif path.is_file():
                found.append((declared, path))
            else:
                problems.append(f"{declared}: not a regular file or a folder")
        total = sum(p.stat().st_size for _, p in found)
        files: list[list] = []
        reserved = 0
        try:
            if total > self.max_bytes or len(found) > MAX_OUTPUT_FILES:
                problems.insert(0, f"the outputs come to {total} bytes in {len(found)} files, over this hub's limit "
                                   f"of {self.max_bytes} bytes and {MAX_OUTPUT_FILES} files: none was kept")
            elif refusal := self._reserve(job.owner, total):
                problems.insert(0, refusal)
            else:
                reserved = total
                for name, local in found:
                    check_input_name(name, "output")
                    dest = files_dir / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    digest = hashlib.sha256()
                    dest.write_bytes(b"")
                    with open(local, "rb") as src, FileWriter(dest) as out:
                        while block := src.read(CHUNK_BYTES):
                            digest.update(block)
                            out.write(block)
                        out.finish()
                    files.append([name, digest.hexdigest(), dest.stat().st_size])
            manifest = {"files": files, "error": "; ".join(problems), "owner": job.owner}
            tmp = target / "manifest.json.tmp"
            tmp.write_bytes(orjson.dumps(manifest))
            os.replace(tmp, self._manifest(job.id))
        finally:
            kept = sum(size for _, _, size in files) if self._manifest(job.id).exists() else 0
            if kept != reserved:  # what was reserved but not kept (a failure, a file that changed) is given back
                with self._lock:
                    held = self._holdings()
                    held[job.owner] = max(0, held.get(job.owner, 0) + kept - reserved)
        (self.root / "pending" / job.id).unlink(missing_ok=True)
        return manifest

    def _reserve(self, owner: str, size: int) -> str:
        """Count `size` bytes of outputs to `owner` if the quota allows; else why not (nothing counted)."""
        with self._lock:
            held = self._holdings()
            have = held.get(owner, 0)
            if self.quota_bytes and have + size > self.quota_bytes:
                return (f"the outputs come to {size} bytes, and {owner} already keeps {have} bytes of outputs at "
                        f"this hub, over its limit of {self.quota_bytes} bytes per user: none was kept (outputs "
                        f"are deleted {self.retention_s / 86400:g} day(s) after their job ends)")
            held[owner] = have + size
            return ""

    def listing(self, job: Job) -> tuple[bool, list[InputFile], str]:
        """(ready, files, error) for a job."""
        try:
            manifest = orjson.loads(self._manifest(job.id).read_bytes())
        except FileNotFoundError:
            waiting = (self.root / "pending" / job.id).exists()  # to be collected (a hub restart comes first)
            if job.final and not waiting and job.updated_at < time.time() - self.retention_s:
                raise FailedPrecondition(
                    f"the outputs of job {job.id} were deleted: this hub keeps outputs "
                    f"{self.retention_s / 86400:g} day(s) after a job ends, and it ended on "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(job.updated_at))}") from None
            return False, [], ""
        return True, [InputFile(n, h, z) for n, h, z in manifest["files"]], manifest["error"]

    def open(self, job: Job, name: str, offset: int):
        """The collected file `name` of the job, opened at `offset` (a FileReader: `read`, `close`)."""
        ready, files, _ = self.listing(job)
        if not ready:
            raise FailedPrecondition(f"the outputs of job {job.id} are not collected yet"
                                     + ("" if job.final else ": it has not ended"))
        entry = next((f for f in files if f.name == name), None)
        if entry is None:
            raise NotFound(f"job {job.id} has no output {name[:200]!r}")
        if offset > entry.size:
            raise FailedPrecondition(f"output {name!r} has {entry.size} bytes; cannot resume at {offset}")
        # written by FileWriter, past the page cache: read back the same way
        return FileReader(self.root / job.id / "files" / entry.name, offset, direct=True)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._release(job_id)
            shutil.rmtree(self.root / job_id, ignore_errors=True)
        (self.root / "pending" / job_id).unlink(missing_ok=True)
