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
import time
from pathlib import Path

import orjson

from federation.blobs import CHUNK_BYTES
from federation.errors import FailedPrecondition, NotFound
from federation.model import InputFile, Job, check_input_name

log = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 10 << 30   # all outputs of one job
MAX_OUTPUT_FILES = 10_000


class Outputs:
    def __init__(self, root: Path, max_bytes: int = MAX_OUTPUT_BYTES, retention_s: int = 30 * 86400):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.retention_s = retention_s  # how long after its job ended collected outputs are kept
        (self.root / "pending").mkdir(parents=True, exist_ok=True)

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
        if total > self.max_bytes or len(found) > MAX_OUTPUT_FILES:
            problems.insert(0, f"the outputs come to {total} bytes in {len(found)} files, over this hub's limit of "
                               f"{self.max_bytes} bytes and {MAX_OUTPUT_FILES} files: none was kept")
        else:
            for name, local in found:
                check_input_name(name, "output")
                dest = files_dir / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with open(local, "rb") as src, open(dest, "wb") as out:
                    while block := src.read(CHUNK_BYTES):
                        digest.update(block)
                        out.write(block)
                    out.flush()
                    os.fsync(out.fileno())
                files.append([name, digest.hexdigest(), dest.stat().st_size])
        manifest = {"files": files, "error": "; ".join(problems)}
        tmp = target / "manifest.json.tmp"
        tmp.write_bytes(orjson.dumps(manifest))
        os.replace(tmp, self._manifest(job.id))
        (self.root / "pending" / job.id).unlink(missing_ok=True)
        return manifest

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
        """The collected file `name` of the job, opened at `offset` (a binary file object)."""
        ready, files, _ = self.listing(job)
        if not ready:
            raise FailedPrecondition(f"the outputs of job {job.id} are not collected yet"
                                     + ("" if job.final else ": it has not ended"))
        entry = next((f for f in files if f.name == name), None)
        if entry is None:
            raise NotFound(f"job {job.id} has no output {name[:200]!r}")
        if offset > entry.size:
            raise FailedPrecondition(f"output {name!r} has {entry.size} bytes; cannot resume at {offset}")
        f = open(self.root / job.id / "files" / entry.name, "rb")  # noqa: SIM115 - the caller closes it
        f.seek(offset)
        return f

    def forget(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)
        (self.root / "pending" / job_id).unlink(missing_ok=True)
