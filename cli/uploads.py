"""Checkpoint uploads: the files' parts go in parallel straight to storage through the presigned
URLs the gateway hands out, then the upload is completed with the parts' ETags.

An interrupted upload resumes: what it has done (the checkpoint, its part URLs, the ETag of
every part stored) is kept in a state file, written after each part, under
`$XDG_CACHE_HOME/esd/uploads/` (else `~/.cache/esd/uploads/`, owner-only: the URLs are
credentials). The same command again sends only the missing parts. A state whose files changed
since, or whose URLs have expired, is not resumed: its unfinished checkpoint is deleted (it
holds the file names) and the upload starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from cli.api import Api, ApiError

MiB = 1024 * 1024
MIN_PART = 8 * MiB  # storage takes parts of 5 MiB and more (the last may be smaller)
MAX_PARTS = 100  # the API's limit per file
URL_LIFETIME = 3600.0  # seconds the gateway's presigned URLs are valid
URL_MARGIN = 300.0  # a state this close to its URLs' end is started over, not resumed
CHUNK = 256 * 1024  # the progress bar moves this often within a part
RETRIES = 3


def part_size(size: int) -> int:
    """Bytes per part: at least MIN_PART, and no more than MAX_PARTS parts (whole MiBs)."""
    wanted = -(-size // MAX_PARTS)
    return max(MIN_PART, -(-wanted // MiB) * MiB)


@dataclass(frozen=True)
class Part:
    number: int  # from 1
    offset: int
    length: int


def parts_of(size: int, per_part: int) -> list[Part]:
    """The parts of a file of `size` bytes (an empty file is one empty part)."""
    count = max(1, -(-size // per_part))
    return [Part(n + 1, n * per_part, min(per_part, size - n * per_part)) for n in range(count)]


@dataclass
class FileUpload:
    path: str
    filename: str
    size: int
    mtime_ns: int
    part_size: int
    urls: list[str] = field(default_factory=list)
    etags: dict[str, str] = field(default_factory=dict)  # part number (as JSON keys are) -> ETag

    @classmethod
    def of(cls, path: Path) -> FileUpload:
        info = path.stat()
        return cls(str(path.resolve()), path.name, info.st_size, info.st_mtime_ns, part_size(info.st_size))

    @property
    def parts(self) -> list[Part]:
        return parts_of(self.size, self.part_size)

    def missing(self) -> list[Part]:
        return [part for part in self.parts if str(part.number) not in self.etags]

    def unchanged(self) -> bool:
        try:
            info = Path(self.path).stat()
        except FileNotFoundError:
            return False
        return (info.st_size, info.st_mtime_ns) == (self.size, self.mtime_ns)

    def tags(self) -> list[dict]:
        return [{"ETag": self.etags[str(part.number)], "PartNumber": part.number} for part in self.parts]


@dataclass
class UploadState:
    gateway: str
    checkpoint_type: str
    files: list[FileUpload]
    checkpoint_id: str = ""
    created_at: float = 0.0

    def resumable(self, now: float) -> bool:
        """Started, its files as they were, and its URLs valid a while longer."""
        return (
            bool(self.checkpoint_id)
            and all(file.unchanged() and len(file.urls) == len(file.parts) for file in self.files)
            and now < self.created_at + URL_LIFETIME - URL_MARGIN
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = path.with_suffix(".tmp")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(asdict(self), file)
        partial.replace(path)  # a crash mid-write leaves the previous state whole

    @classmethod
    def load(cls, path: Path) -> UploadState | None:
        try:
            values = json.loads(path.read_text())
            return cls(**{**values, "files": [FileUpload(**file) for file in values["files"]]})
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            return None


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "esd" / "uploads"


def state_file(directory: Path, gateway: str, checkpoint_type: str, paths: Sequence[Path]) -> Path:
    """One state per gateway, type and set of files (by their absolute paths)."""
    names = sorted(str(path.resolve()) for path in paths)
    digest = hashlib.sha256("\n".join([gateway.rstrip("/"), checkpoint_type, *names]).encode()).hexdigest()
    return directory / f"{digest[:32]}.json"


Progress = Callable[[int], None]  # bytes sent since the last call


class CheckpointUpload:
    """Uploads `paths` as one checkpoint of `checkpoint_type` (see the module docstring)."""

    def __init__(
        self,
        api: Api,
        paths: Sequence[Path],
        checkpoint_type: str,
        *,
        states: Path,
        parallel: int = 4,
        say: Callable[[str], None] = lambda _: None,
    ) -> None:
        names = [path.name for path in paths]
        if len(set(names)) != len(names):
            raise ApiError("two of the files have the same name; a checkpoint's file names must differ")
        self.api = api
        self.paths = list(paths)
        self.checkpoint_type = checkpoint_type
        self.state_path = state_file(states, api.config.url, checkpoint_type, paths)
        self.parallel = max(1, parallel)
        self.say = say
        self.lock = threading.Lock()
        self.state = self._state()

    @property
    def total_bytes(self) -> int:
        return sum(file.size for file in self.state.files)

    @property
    def done_bytes(self) -> int:
        return sum(part.length for file in self.state.files for part in file.parts if str(part.number) in file.etags)

    def _state(self) -> UploadState:
        previous = UploadState.load(self.state_path)
        if previous is not None:
            if previous.resumable(time.time()):
                self.say(f"resuming the upload of checkpoint {previous.checkpoint_id}")
                return previous
            self.say(f"starting over: the interrupted upload of {previous.checkpoint_id or 'these files'} is stale")
            self._discard(previous)
        return UploadState(self.api.config.url, self.checkpoint_type, [FileUpload.of(path) for path in self.paths])

    def _discard(self, state: UploadState) -> None:
        if state.checkpoint_id:
            try:
                self.api.call("DELETE", "/checkpoints", json={"checkpoint_id_list": [state.checkpoint_id]})
            except ApiError as error:
                self.say(f"could not delete the unfinished checkpoint {state.checkpoint_id}: {error}")
        self.state_path.unlink(missing_ok=True)

    def run(self, progress: Progress = lambda _: None) -> dict:
        """Create (unless resuming), send every missing part, complete; the checkpoint's record."""
        state = self.state
        if not state.checkpoint_id:
            created = self.api.call(
                "POST",
                "/checkpoints",
                json={
                    "checkpoint_type": self.checkpoint_type,
                    "filenames": [{"filename": file.filename, "parts_number": len(file.parts)} for file in state.files],
                },
            )
            for file in state.files:
                file.urls = created["s3PresignUrl"][file.filename]
            state.checkpoint_id = created["checkpoint"]["id"]
            state.created_at = time.time()
            state.save(self.state_path)
        work = [(file, part) for file in state.files for part in file.missing()]
        pool = ThreadPoolExecutor(self.parallel)
        try:
            for finished in [pool.submit(self._send, file, part, progress) for file, part in work]:
                finished.result()
        except BaseException:  # a part failed or ^C: the parts not begun are not sent; the state keeps the rest
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
        checkpoint = self.api.call(
            "PUT",
            f"/checkpoints/{state.checkpoint_id}",
            json={"status": "Active", "multi_parts_tags": {file.filename: file.tags() for file in state.files}},
        )
        self.state_path.unlink(missing_ok=True)
        return checkpoint.get("checkpoint", checkpoint) or {"id": state.checkpoint_id}

    def _send(self, file: FileUpload, part: Part, progress: Progress) -> None:
        for attempt in range(1, RETRIES + 1):
            sent, last = 0, attempt == RETRIES

            def chunks() -> Iterator[bytes]:
                nonlocal sent
                with open(file.path, "rb") as source:
                    source.seek(part.offset)
                    left = part.length
                    while left > 0:
                        chunk = source.read(min(CHUNK, left))
                        if not chunk:
                            raise ApiError(f"{file.path} is shorter than when the upload began")
                        left -= len(chunk)
                        sent += len(chunk)
                        progress(len(chunk))
                        yield chunk

            try:
                response = httpx.put(
                    file.urls[part.number - 1],
                    content=chunks(),
                    headers={"content-length": str(part.length)},
                    timeout=httpx.Timeout(60, write=300),
                )
            except httpx.HTTPError as error:
                failure = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 200 and response.headers.get("etag"):
                    with self.lock:
                        file.etags[str(part.number)] = response.headers["etag"]
                        self.state.save(self.state_path)
                    return
                failure = f"HTTP {response.status_code}"
                # expired or refused: trying again will not help
                if response.status_code in (400, 403, 404):
                    failure += " (the upload's URLs may have expired)"
                    last = True
            progress(-sent)  # what this attempt sent is sent again
            if last:
                raise ApiError(
                    f"part {part.number} of {file.filename} could not be stored ({failure}); "
                    "run the same command again to resume"
                )
            time.sleep(attempt)
