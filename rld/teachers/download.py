"""Resumable downloads (urllib, HTTP Range requests) into a `.part` file beside the target,
with a tqdm progress bar on a terminal.

A connection that drops keeps the `.part` file and its sidecar `<part>.json` (the URL and
the server's validator): the same command continues where it stopped (`Range` with
`If-Range`, so a file that changed on the server starts over).  A full disk removes them.
"""

from __future__ import annotations

import errno
import http.client
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from rld.teachers.configs import TeacherError

CHUNK = 1 << 20
TIMEOUT_S = 60


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def name_of(location: str) -> str:
    """The file name a URL or a path ends with."""
    return location.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


def disk_full(part: Path, error: OSError, remove: bool = True) -> TeacherError:
    """The error of a write to `part` that failed; a full disk also removes the partial file
    (with `remove`)."""
    if error.errno == errno.ENOSPC:
        if remove:
            part.unlink(missing_ok=True)
            part.with_name(part.name + ".json").unlink(missing_ok=True)
        return TeacherError(f"no space left on the device writing {part}: free some space and "
                            "run the same command again (nothing was installed)")
    return TeacherError(f"cannot write {part}: {error.strerror or error}")


def copy_to(path: Path, part: Path) -> None:
    """A local file into `part` (beside its target, so the install is a rename)."""
    try:
        shutil.copyfile(path, part)
    except OSError as e:
        raise disk_full(part, e) from None


def _resume_from(part: Path, url: str) -> tuple[int, str | None]:
    """(bytes already in `part` for this URL, the server's validator); (0, None) when the
    part is absent or belongs to another URL."""
    try:
        meta = json.loads(part.with_name(part.name + ".json").read_text())
        if meta.get("url") == url and part.is_file():
            return part.stat().st_size, meta.get("validator")
    except (OSError, ValueError, AttributeError):
        pass
    return 0, None


def _open(url: str, have: int, validator: str | None):
    headers = {"User-Agent": "rld.teachers"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if validator:
            headers["If-Range"] = validator
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # no such range: start over
            return None
        raise TeacherError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise TeacherError(f"cannot download {url}: {reason}") from None


def _start(response, have: int) -> int | None:
    """Where the response's bytes go in the part: 0 for a whole file, `have` for the range
    asked; None for a range that is not the one asked (the download starts over)."""
    if response.status != 206:
        return 0
    first = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
    return have if first.strip() == str(have) else None


def download(url: str, part: Path, progress: bool = True) -> None:
    """`url` into `part`, resuming a part left by an interrupted download of the same URL;
    TeacherError (one line) when it cannot be completed."""
    from tqdm import tqdm

    have, validator = _resume_from(part, url)
    response = _open(url, have, validator)
    if response is not None and _start(response, have) is None:
        response.close()
        response = None
    if response is None:  # the part is not a prefix of this file: start over
        part.unlink(missing_ok=True)
        have, response = 0, _open(url, 0, None)
    with response:
        start = _start(response, have) or 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        meta = part.with_name(part.name + ".json")
        try:  # a write that fails (a full disk) is an OSError; a dropped read is not
            part.parent.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps({"url": url, "validator": validator}) + "\n")
            with open(part, "r+b" if start else "wb") as f, tqdm(
                    total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=name_of(url), disable=None if progress else True, leave=False) as bar:
                f.seek(start)
                f.truncate()
                done = start + _stream(response, f, bar)
        except OSError as e:
            raise disk_full(part, e) from None
    if total is not None and done < total:
        raise TeacherError(f"the download of {url} was interrupted after {done:,} of "
                           f"{total:,} bytes: run the same command again to resume it")
    meta.unlink(missing_ok=True)


def _stream(response, f, bar) -> int:
    """Copy the response's body into `f`; the number of bytes copied (fewer than announced
    when the connection dropped: the caller tells).  Write errors propagate (OSError)."""
    received = 0
    while True:
        try:
            chunk = response.read(CHUNK)
        except (OSError, http.client.HTTPException):
            return received  # a dropped connection: what arrived stays for the resume
        if not chunk:
            return received
        f.write(chunk)
        received += len(chunk)
        bar.update(len(chunk))
