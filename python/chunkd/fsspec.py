"""An fsspec filesystem for ``chunkd://`` URLs, on the package's native client.

Installed with the package and registered through fsspec's entry point (``fsspec.specs`` in
python/pyproject.toml), so any fsspec user opens chunkd URLs without importing this module::

    import fsspec, xarray as xr, zarr, pandas as pd
    xr.open_zarr("chunkd://127.0.0.1:7878/era5.zarr")
    zarr.open("chunkd://127.0.0.1:7878/era5.zarr", mode="r")
    with fsspec.open("chunkd://127.0.0.1:7878/tables/t.parquet") as f: ...
    pd.read_parquet("chunkd://127.0.0.1:7878/tables/t.parquet")
    fs = fsspec.filesystem("chunkd", address="unix:/run/chunkd.sock")

URLs: ``chunkd://HOST:PORT/key/path`` and ``chunkd+unix:///run/chunkd.sock/key/path`` (or
``chunkd+unix://%2Frun%2Fchunkd.sock/key/path``; see :mod:`chunkd._address`). The filesystem's
paths are the server's keys; "directories" are key prefixes ending in '/' (the server has no
empty directories: ``mkdir`` does nothing, as on object stores).

What each operation costs: ``cat_file`` (and a file opened for reading, block by block) is one
Get of the byte range; ``cat_ranges`` and ``cat`` of many paths are one GetMany call per 4096
items; ``pipe_file``, ``put_file`` and a file opened for writing are one Put of the whole
value when it is closed (``mode="create"`` / ``"xb"``: only if the key does not exist yet,
atomically on the server, else ``FileExistsError``); ``ls`` and ``info`` of a directory are one
List; ``find`` is one List of the whole prefix; ``rm`` is one Delete per key. A missing key
raises ``FileNotFoundError``. Values come back as ``bytes`` (fsspec's contract): one copy out
of the client's buffer, which :class:`chunkd.zarr.ChunkdStore` does not make (see docs/python.md,
"The store object or the URL").

The filesystem is asynchronous (``fsspec.asyn.AsyncFileSystem``): zarr's ``FsspecStore`` awaits
its calls on zarr's own event loop; synchronous callers run them on fsspec's loop thread. It
pickles by its arguments, and a copy inherited by a forked child makes its own connection
there (see :meth:`chunkd.Client`), so data loaders that fork work.
"""

from __future__ import annotations

import asyncio
import errno
import os
import posixpath
from typing import Any

from fsspec.asyn import AsyncFileSystem
from fsspec.spec import AbstractBufferedFile
from fsspec.utils import stringify_path

from chunkd import _common as c
from chunkd._address import DEFAULT_ADDRESS, parse_url, url_of
from chunkd.aio import AsyncClient
from chunkd.errors import NotFoundError, PreconditionFailed

__all__ = ["ChunkdFileSystem"]

_PROTOCOLS = ("chunkd", "chunkd+unix")
# Puts and deletes one call of rm / pipe / put keeps in flight at once.
_CONCURRENCY = 64


def _not_found(path: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, f"chunkd: no such key {path!r}", path)


def _exists_error(path: str) -> FileExistsError:
    return FileExistsError(errno.EEXIST, f"chunkd: key {path!r} exists", path)


class ChunkdFileSystem(AsyncFileSystem):
    """fsspec's view of one chunkd server (``chunkd://`` and ``chunkd+unix://`` URLs).

    Args:
        address: the server (``HOST:PORT``, ``unix:/path``, ``chunkd://HOST:PORT``,
            ``chunkd+unix:///path``); a URL's own address wins (fsspec passes it here).
        timeout, retries, delivery, shm_dir, tls_ca, tls, tls_cert, tls_key,
        tls_server_name, token: as :class:`chunkd.Client` takes them.
        **kwargs: fsspec's own (``asynchronous``, ``loop``, ``batch_size``,
            ``skip_instance_cache``).
    """

    protocol = _PROTOCOLS
    root_marker = ""
    async_impl = True
    cachable = True

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = c.DEFAULT_TIMEOUT,
        retries: int = c.DEFAULT_RETRIES,
        delivery: str = "inline",
        shm_dir: str = c.DEFAULT_SHM_DIR,
        tls_ca: str | bytes | None = None,
        tls: bool = False,
        tls_cert: str | bytes | None = None,
        tls_key: str | bytes | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.target = c.target_of(address)
        self._client_kwargs = {
            "timeout": timeout,
            "retries": retries,
            "delivery": c.check_delivery(delivery),
            "shm_dir": shm_dir,
            "tls_ca": tls_ca,
            "tls": tls,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "tls_server_name": tls_server_name,
            "token": token,
        }
        self._aio: AsyncClient | None = None

    # -- URLs ------------------------------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = stringify_path(path)
        if path.startswith(("chunkd://", "chunkd+unix://")):
            path = parse_url(path)[1]
        return path.strip("/")

    @staticmethod
    def _get_kwargs_from_urls(path):
        path = stringify_path(path)
        if path.startswith(("chunkd://", "chunkd+unix://")):
            return {"address": parse_url(path)[0]}
        return {}

    def unstrip_protocol(self, name: str) -> str:
        base = url_of(self.target)
        name = self._strip_protocol(name)
        return f"{base}/{name}" if name else base

    # -- the client ------------------------------------------------------------------------------

    def _client(self) -> AsyncClient:
        # One client serves every event loop (fsspec's own, zarr's); a forked child's first
        # call makes its own connection (chunkd._common.ClientBase).
        if self._aio is None:
            self._aio = AsyncClient(self.target, **self._client_kwargs)
        return self._aio

    # -- reads -----------------------------------------------------------------------------------

    async def _range(self, path: str, start: int | None, end: int | None) -> dict[str, int]:
        """fsspec's (start, end) (negative: from the end; start<0 with end None: a suffix) as
        the client's range arguments; a Stat only where a negative bound needs the size."""
        if start is not None and start < 0 and end is None:
            return {"suffix": -start}
        if (start is not None and start < 0) or (end is not None and end < 0):
            size = (await self._info(path))["size"]
            if start is not None and start < 0:
                start = max(size + start, 0)
            if end is not None and end < 0:
                end = max(size + end, 0)
        kwargs: dict[str, int] = {}
        if start:
            kwargs["start"] = start
        if end is not None:
            kwargs["start"] = start or 0
            kwargs["end"] = max(end, start or 0)
        return kwargs

    async def _cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        rng = await self._range(path, start, end)
        if rng.get("end") is not None and rng["end"] == rng["start"]:
            if not (await self._client().stat(path)).exists:
                raise _not_found(path)
            return b""
        try:
            return bytes(await self._client().get(path, **rng))
        except NotFoundError:
            raise _not_found(path) from None

    async def _cat_ranges(
        self, paths, starts, ends, max_gap=None, batch_size=None, on_error="return", **kwargs
    ):
        # One GetMany call (per 4096 items) for the whole batch; each item's error in its place.
        if not isinstance(paths, list):
            raise TypeError("paths must be a list")
        if not isinstance(starts, list):
            starts = [starts] * len(paths)
        if not isinstance(ends, list):
            ends = [ends] * len(paths)
        if len(starts) != len(paths) or len(ends) != len(paths):
            raise ValueError("paths, starts and ends must have the same length")
        paths = [self._strip_protocol(p) for p in paths]
        ranges = await asyncio.gather(
            *(self._range(p, s, e) for p, s, e in zip(paths, starts, ends, strict=True)),
            return_exceptions=True,
        )
        out: list[Any] = list(ranges)
        todo = [i for i, r in enumerate(ranges) if not isinstance(r, BaseException)]
        items = [c.GetItem(paths[i], **ranges[i]) for i in todo]
        results = await self._client().get_many(items) if items else []
        for i, value in zip(todo, results, strict=True):
            if isinstance(value, NotFoundError):
                out[i] = _not_found(paths[i])
            elif isinstance(value, Exception):
                out[i] = value
            else:
                out[i] = bytes(value)
        if on_error != "return":
            for value in out:
                if isinstance(value, BaseException):
                    raise value
        return out

    async def _cat(self, path, recursive=False, on_error="raise", batch_size=None, **kwargs):
        paths = await self._expand_path(path, recursive=recursive)
        files = [p for p in paths if not await self._isdir_listed(p, paths)]
        out = await self._cat_ranges(files, None, None, on_error="return")
        if on_error == "raise":
            for value in out:
                if isinstance(value, BaseException):
                    raise value
        if len(paths) > 1 or isinstance(path, list) or paths[0] != self._strip_protocol(path):
            return {
                k: v
                for k, v in zip(files, out, strict=True)
                if on_error != "omit" or not isinstance(v, BaseException)
            }
        return out[0]

    async def _isdir_listed(self, path: str, paths: list[str]) -> bool:
        # expand_path lists directories among the files: a path with another under it.
        prefix = f"{path}/"
        return any(p.startswith(prefix) for p in paths)

    async def _get_file(self, rpath, lpath, **kwargs):
        rpath = self._strip_protocol(rpath)
        if os.path.isdir(lpath) and await self._isdir(rpath):
            return
        try:
            data = await self._client().get(rpath)
        except NotFoundError:
            if await self._isdir(rpath):
                os.makedirs(lpath, exist_ok=True)
                return
            raise _not_found(rpath) from None
        parent = os.path.dirname(lpath)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(lpath, "wb") as f:
            f.write(data)

    # -- writes ----------------------------------------------------------------------------------

    async def _pipe_file(self, path, value, mode="overwrite", **kwargs):
        path = self._strip_protocol(path)
        if mode == "create":
            try:
                await self._client().put(path, value, if_generation_match=0)
            except PreconditionFailed:
                raise _exists_error(path) from None
        elif mode == "overwrite":
            await self._client().put(path, value)
        else:
            raise ValueError(f"chunkd: pipe_file mode must be 'overwrite' or 'create', got {mode!r}")

    async def _put_file(self, lpath, rpath, mode="overwrite", **kwargs):
        if os.path.isdir(lpath):
            return  # no empty directories: the files under it make it
        with open(lpath, "rb") as f:
            data = f.read()
        await self._pipe_file(rpath, data, mode=mode)

    async def _cp_file(self, path1, path2, **kwargs):
        path1 = self._strip_protocol(path1)
        try:
            data = await self._client().get(path1)
        except NotFoundError:
            if await self._isdir(path1):
                return
            raise _not_found(path1) from None
        await self._client().put(self._strip_protocol(path2), data)

    async def _mkdir(self, path, create_parents=True, **kwargs):
        pass  # a directory exists while a key under it does

    async def _makedirs(self, path, exist_ok=False):
        pass

    async def _rm_file(self, path, **kwargs):
        path = self._strip_protocol(path)
        try:
            await self._client().delete(path)
        except NotFoundError:
            raise _not_found(path) from None

    async def _rm(self, path, recursive=False, batch_size=None, maxdepth=None, **kwargs):
        # expand_path lists the directories beside the keys (prefixes, gone with their last
        # key: nothing to delete) and a path that names nothing as itself: FileNotFoundError
        # when nothing at all was deleted.
        paths = await self._expand_path(path, recursive=recursive, maxdepth=maxdepth)
        semaphore = asyncio.Semaphore(batch_size or _CONCURRENCY)

        async def rm_one(p: str) -> bool:
            async with semaphore:
                try:
                    await self._client().delete(p)
                except NotFoundError:
                    return False
                return True

        if not any(await asyncio.gather(*(rm_one(p) for p in paths))):
            raise _not_found(paths[0])

    # -- metadata --------------------------------------------------------------------------------

    async def _info(self, path, **kwargs):
        path = self._strip_protocol(path)
        if path == "":
            return {"name": "", "size": 0, "type": "directory"}
        stat = await self._client().stat(path)
        if stat.exists:
            return {"name": path, "size": stat.size, "type": "file", "generation": stat.generation}
        listing = await self._client().list(f"{path}/", directory=True)
        if listing.entries or listing.prefixes:
            return {"name": path, "size": 0, "type": "directory"}
        raise _not_found(path)

    async def _ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        prefix = f"{path}/" if path else ""
        listing = await self._client().list(prefix, directory=True)
        out = [{"name": e.key, "size": e.size, "type": "file"} for e in listing.entries]
        out += [{"name": p.rstrip("/"), "size": 0, "type": "directory"} for p in listing.prefixes]
        out.sort(key=lambda entry: entry["name"])
        if not out and path:
            out = [await self._info(path)]  # a file: itself; nothing: FileNotFoundError
        return out if detail else [entry["name"] for entry in out]

    async def _find(self, path, maxdepth=None, withdirs=False, **kwargs):
        if maxdepth is not None:
            return await super()._find(path, maxdepth=maxdepth, withdirs=withdirs, **kwargs)
        # One listing of the whole prefix.
        detail = kwargs.pop("detail", False)
        path = self._strip_protocol(path)
        prefix = f"{path}/" if path else ""
        out: dict[str, dict[str, Any]] = {}
        for entry in (await self._client().list(prefix)).entries:
            out[entry.key] = {"name": entry.key, "size": entry.size, "type": "file"}
        if withdirs and out:
            dirs = {}
            for name in out:
                parent = posixpath.dirname(name)
                while len(parent) > len(path) and parent not in dirs:
                    dirs[parent] = {"name": parent, "size": 0, "type": "directory"}
                    parent = posixpath.dirname(parent)
            if path:
                dirs[path] = {"name": path, "size": 0, "type": "directory"}
            out.update(dirs)
        if not out and path:
            stat = await self._client().stat(path)
            if stat.exists:
                out[path] = {"name": path, "size": stat.size, "type": "file"}
        names = sorted(out)
        return {name: out[name] for name in names} if detail else names

    # -- files -----------------------------------------------------------------------------------

    def _open(
        self,
        path,
        mode="rb",
        block_size=None,
        autocommit=True,
        cache_options=None,
        **kwargs,
    ):
        path = self._strip_protocol(path)
        if mode == "xb" and self.exists(path):
            raise _exists_error(path)
        return ChunkdFile(
            self, path, mode, block_size or "default", autocommit, cache_options, **kwargs
        )


class ChunkdFile(AbstractBufferedFile):
    """A file of a chunkd key: reads fetch byte ranges (one Get each, cached by fsspec's
    block cache); writes collect the value and store it whole with one Put at close (``xb``:
    only if the key does not exist yet; ``ab``: the old value, then what was written)."""

    def __init__(self, fs, path, mode, block_size, autocommit, cache_options, **kwargs):
        super().__init__(
            fs,
            path,
            mode=mode,
            block_size=block_size,
            autocommit=autocommit,
            cache_options=cache_options,
            **kwargs,
        )
        if mode == "ab" and fs.exists(path):
            self.buffer.write(fs.cat_file(path))

    def _fetch_range(self, start, end):
        return self.fs.cat_file(self.path, start, end)

    def _initiate_upload(self):
        pass

    def _upload_chunk(self, final=False):
        if not final:
            return False  # keep collecting: a value is stored whole
        self.fs.pipe_file(
            self.path, self.buffer.getvalue(), mode="create" if self.mode == "xb" else "overwrite"
        )
        return True
