"""The two files of a batch job (`jaxinfer batch`): the OpenAI batch input, and the output that
results are appended to.

The output is the job's only state. Each result is one write of one whole line, and the file
is fsync'd as results arrive, so whatever kills the job (a crash, SIGKILL, a lost machine) leaves
complete lines plus at most one torn last line. Opening the output again cuts that line off and
reports which custom_ids are done, so a rerun of the same command skips them: every request ends
up in the output exactly once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from typing import Any

MAX_LISTED = 20  # problems named in one error message; the rest are counted


class BatchFileError(ValueError):
    """An input or output file that the job cannot use as it is; nothing has been run."""


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    """One line of the input.

    Attributes:
      line: its line number (1-based), for messages.
      custom_id: the caller's id, unique in the file, that its result carries.
      method, url, body: as given; they are checked per line when the line runs, so one bad
        request is one error result rather than a refused file.
    """

    line: int
    custom_id: str
    method: Any
    url: Any
    body: Any


def _problems_error(path: str, what: str, problems: list[str]) -> BatchFileError:
    listed = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return BatchFileError(f"{path}: {len(problems)} {what}:\n  {listed}{more}")


def read_requests(path: str) -> list[BatchRequest]:
    """The requests of an OpenAI batch input file (JSONL; blank lines are skipped).

    Raises:
      BatchFileError: naming every line that has no request to run or to report a result for
        (not JSON, not an object, no string custom_id) and every repeated custom_id: such a file
        is refused before anything runs, as OpenAI's batch validation refuses it.
      OSError: the file cannot be read.
    """
    requests, problems, seen = [], [], {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"line {n}: is not UTF-8 text")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(f"line {n}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"line {n}: must be a JSON object like "
                                '{"custom_id": ..., "method": "POST", "url": ..., "body": {...}}')
                continue
            custom_id = obj.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                problems.append(f"line {n}: custom_id must be a non-empty string, got {custom_id!r}")
                continue
            if custom_id in seen:
                problems.append(f"line {n}: custom_id {custom_id!r} is already used on line {seen[custom_id]}")
                continue
            seen[custom_id] = n
            requests.append(BatchRequest(n, custom_id, obj.get("method"), obj.get("url"), obj.get("body")))
    if problems:
        raise _problems_error(path, "line(s) are not batch requests (custom_ids must be unique)", problems)
    if not requests:
        raise BatchFileError(f"{path} holds no requests")
    return requests


def _custom_id_of(raw: bytes) -> str | None:
    """The custom_id of a complete result line, or None when the line is not one."""
    if not raw.endswith(b"\n"):
        return None
    try:
        obj = json.loads(raw)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        return None
    custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
    return custom_id if isinstance(custom_id, str) else None


class ResultFile:
    """The output file, open for appending under an exclusive lock, with what it already holds.

    Args:
      path: created when missing; an existing file is resumed, never overwritten.
    Attributes:
      done: custom_id -> line number of each result already in the file.
      torn_bytes: the size of the torn last line cut off on opening (0: none).
    Raises:
      BatchFileError: another job holds the file, or a line before the last is not a result
        (so the file is not a batch output, and nothing is cut or appended).
    """

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self._dirty = False
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BatchFileError(f"{path} is being written by another batch job") from None
            self.done, self.torn_bytes = self._recover()
        except BaseException:
            os.close(self._fd)
            raise

    def _recover(self) -> tuple[dict[str, int], int]:
        size = os.fstat(self._fd).st_size
        done: dict[str, int] = {}
        end = 0  # where the complete lines end
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                custom_id = _custom_id_of(raw)
                if custom_id is None:
                    if end + len(raw) < size:
                        raise BatchFileError(f"{self.path}:{n}: is not a batch result line; is this the output "
                                             "of a batch job? (nothing was changed)")
                    break  # the last line: a write that a kill cut short
                if custom_id in done:
                    raise BatchFileError(f"{self.path}:{n}: custom_id {custom_id!r} is already on line "
                                         f"{done[custom_id]} (nothing was changed)")
                done[custom_id] = n
                end += len(raw)
        if end < size:
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        return done, size - end

    def append(self, record: dict[str, Any]) -> None:
        """Appends one result line (a single write; `sync` makes it durable)."""
        # allow_nan=False: the output is strict JSON, as the server's answers are.
        data = memoryview((json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))
        while data:
            data = data[os.write(self._fd, data):]
        self._dirty = True

    def sync(self) -> None:
        """Flushes the lines appended so far to the disk."""
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def close(self) -> None:
        """Syncs, then closes the file (releasing the lock)."""
        if self._fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> "ResultFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
