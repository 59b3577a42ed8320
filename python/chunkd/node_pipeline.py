"""Decoded once per node: a zarr codec pipeline that shares decoded chunks through chunkd.

``chunkd.zarr.NodeCodecPipeline`` (defined here, re-exported there, and registered with zarr
under that name) is zarr's own ``BatchedCodecPipeline`` with one method changed: ``read``. For
the chunks a read takes from a :class:`chunkd.zarr.ChunkdStore` into host memory, it asks the
server for the *derived* entry of each chunk: the chunk decoded by the array's codec chain,
keyed by the chunk's key, the source's generation (the server's side) and a derivation string
(this module's side: the codec chain, dtype, chunk shape and fill value, and for a sharded
array the inner chunk). Every process of the node reads the same entry:

* a hit is the decoded chunk, in the server's shared memory (a read-only view under a lease)
  or inline: copied into zarr's output array, no decode;
* a miss that this process is told to produce (``GetResult.production_id``): the source is
  read at exactly the generation the server named (``if_generation_match``), decoded with
  zarr's codecs, written into the output and published (``put_derived``); any failure gives
  the production up (``abandon_derived``), so that a waiting reader takes it over;
* a miss that is not this process's to produce (the wait for another producer timed out, a
  server without derived entries, a value of the wrong size): zarr's pipeline, unchanged, for
  those chunks;
* a missing chunk is the fill value, as zarr makes it.

Sharded arrays (a codec chain that is one ``ShardingCodec``): the inner chunks are the unit. A
hit needs no read of the shard index; a miss reads the index once per shard and the inner
chunks' byte ranges, at the generation of the production.

Writes, reads from any other store, reads into device memory (GPU prototypes) and dtypes with
no fixed size are zarr's pipeline unchanged. See docs/python.md, "Decoded once per node".
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.abc.store import RangeByteRequest
from zarr.codecs.sharding import ShardingCodec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.codec_pipeline import BatchedCodecPipeline, fill_value_or_default
from zarr.core.indexing import get_indexer
from zarr.storage import StorePath

from chunkd import _common as c
from chunkd.errors import ChunkdError, NotFoundError, PreconditionFailed

if TYPE_CHECKING:
    from zarr.abc.store import ByteGetter, ByteRequest
    from zarr.core.array_spec import ArraySpec
    from zarr.abc.buffer import Buffer, BufferPrototype, NDBuffer

    from chunkd.zarr import ChunkdStore

__all__ = ["NodeCodecPipeline", "DERIVATION_VERSION", "PIPELINE_PATH"]

# The name zarr's ``codec_pipeline.path`` setting takes.
PIPELINE_PATH = "chunkd.zarr.NodeCodecPipeline"
# The first line of every derivation: a change of what a derived entry holds (its layout, the
# fields below) changes it, so that entries of an older client are never taken for new ones.
DERIVATION_VERSION = b"chunkd.zarr.decoded/1\n"
# The server takes derivations of 1 to 4096 bytes: a longer description is replaced by its
# SHA-256 (the description is what identifies the entry; the hash keeps it that).
_MAX_DERIVATION = 4096
# Items of one GetMany call of derived reads (as ChunkdStore's batcher: bounded replies).
_MAX_ITEMS = 256
# numpy kinds whose decoded chunk is a fixed-size block of bytes (frombuffer-able).
_FIXED_KINDS = frozenset("biufcmMV")


class _SourceChanged(Exception):
    """The source moved past the production's generation while it was being read."""


def _decoded_dtype(spec: ArraySpec) -> np.dtype | None:
    """The dtype a derived entry holds the chunk in: the array's, in native byte order (the
    layout is the same whatever the ``bytes`` codec's endianness); None for dtypes without a
    fixed size (strings, objects), which stay with zarr's pipeline."""
    try:
        dtype = np.dtype(spec.dtype.to_native_dtype())
    except Exception:  # noqa: BLE001 - a dtype numpy cannot express: zarr's pipeline
        return None
    if dtype.kind not in _FIXED_KINDS or dtype.hasobject or dtype.itemsize == 0:
        return None
    return dtype.newbyteorder("=")


def derivation(
    codecs: Iterable[Any],
    spec: ArraySpec,
    dtype: np.dtype,
    inner: tuple[int, ...] | None = None,
) -> bytes:
    """The canonical description of a decoded chunk: the codec chain (each codec's
    ``to_dict()``), the decoded dtype and shape, the fill value's bytes (a sharded array's
    missing inner chunk decodes to it) and, for an inner chunk of a shard, its coordinates in
    the shard and its shape. Sorted-key JSON after a version line."""
    fill = np.asarray(fill_value_or_default(spec), dtype=dtype).tobytes().hex()
    description: dict[str, Any] = {
        "codecs": [codec.to_dict() for codec in codecs],
        "dtype": dtype.str,
        "shape": list(spec.shape),
        "fill": fill,
    }
    if inner is not None:
        description["inner"] = list(inner)
    text = DERIVATION_VERSION + json.dumps(
        description, sort_keys=True, separators=(",", ":"), default=str
    ).encode()
    if len(text) > _MAX_DERIVATION:
        text = DERIVATION_VERSION + b"sha256:" + hashlib.sha256(text).hexdigest().encode()
    return text


def _is_host(prototype: BufferPrototype) -> bool:
    from chunkd.zarr import _holds_device_memory

    try:
        return not _holds_device_memory(prototype.buffer)
    except RuntimeError:
        return False


class _PinnedGetter:
    """A ByteGetter of one key at one generation: every read asks for exactly that generation
    (``if_generation_match``), so that what a production decodes is the source it names.
    A key that moved on or went away raises _SourceChanged."""

    def __init__(self, store: ChunkdStore, key: str, generation: int) -> None:
        self.store = store
        self.key = key
        self.generation = generation

    async def get(
        self, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        from chunkd.zarr import _range_kwargs

        try:
            result = await self.store._aio().read(
                self.key, **_range_kwargs(byte_range), if_generation_match=self.generation
            )
        except (NotFoundError, PreconditionFailed) as e:
            raise _SourceChanged(self.key) from e
        return self.store._to_buffer(result, prototype)


@dataclass(frozen=True)
class _Unit:
    """One derived entry a read needs: a chunk (or an inner chunk of a shard) of a ChunkdStore,
    what part of it goes where in the output."""

    store: ChunkdStore
    key: str  # the server's key (the store's prefix included)
    derivation: bytes
    spec: ArraySpec  # the decoded chunk's spec (an inner chunk's for a shard)
    dtype: np.dtype
    chunk_selection: Any  # the part of the decoded chunk read
    target: np.ndarray  # where it goes (a view of zarr's output, or of a shard's buffer)
    target_selection: Any
    drop_axes: tuple[int, ...]
    # The batch_info item zarr's pipeline reads on a fallback (chunks that are not shards).
    item: Any = None
    # Shards: the shard's getter, spec and this inner chunk's coordinates.
    shard: Any = None
    inner: tuple[int, ...] | None = None


@dataclass(frozen=True)
class NodeCodecPipeline(BatchedCodecPipeline):
    """zarr's ``BatchedCodecPipeline`` whose reads from a :class:`chunkd.zarr.ChunkdStore`
    share decoded chunks among every process of the node (see the module's docstring).

    Turned on by ``zarr.config.set({"codec_pipeline.path": "chunkd.zarr.NodeCodecPipeline"})``
    or ``ChunkdStore(..., decoded_cache=True)``; made by zarr (``from_codecs``) like the class
    it extends, and pickled with the arrays that hold it.
    """

    async def read(
        self,
        batch_info: Iterable[tuple[ByteGetter, ArraySpec, Any, Any, bool]],
        out: NDBuffer,
        drop_axes: tuple[int, ...] = (),
    ) -> None:
        batch_info = list(batch_info)
        target = out.as_ndarray_like()
        node: list[tuple[ChunkdStore, Any]] = []
        rest: list[Any] = []
        if isinstance(target, np.ndarray):
            supported: dict[int, bool] = {}
            for item in batch_info:
                store = self._node_store(item)
                if store is not None:
                    ok = supported.get(id(store))
                    if ok is None:
                        ok = supported[id(store)] = await store._derived_supported()
                    if ok:
                        node.append((store, item))
                        continue
                rest.append(item)
        else:
            rest = batch_info
        if not node:
            await super().read(rest, out, drop_axes)
            return
        jobs = [self._read_node(node, target, drop_axes, out)]
        if rest:
            jobs.append(super().read(rest, out, drop_axes))
        await asyncio.gather(*jobs)

    # -- which chunks ----------------------------------------------------------------------------

    def _node_store(self, item: Any) -> ChunkdStore | None:
        """The ChunkdStore `item` is read from when it can be read decoded: a chunk of a
        ChunkdStore (not opted out), into host memory, of a fixed-size dtype."""
        from chunkd.zarr import ChunkdStore

        byte_getter, spec = item[0], item[1]
        if not isinstance(byte_getter, StorePath):
            return None
        store = byte_getter.store
        if not isinstance(store, ChunkdStore) or store.decoded_cache is False:
            return None
        if _decoded_dtype(spec) is None or not _is_host(spec.prototype):
            return None
        return store

    def _sharding(self) -> ShardingCodec | None:
        """The ShardingCodec when it is the whole chain (its inner chunks are then the unit);
        with codecs around it, the shard decoded whole is."""
        if (
            isinstance(self.array_bytes_codec, ShardingCodec)
            and not self.array_array_codecs
            and not self.bytes_bytes_codecs
        ):
            return self.array_bytes_codec
        return None

    def _units(
        self, node: list[tuple[ChunkdStore, Any]], target: np.ndarray, drop_axes: tuple[int, ...]
    ) -> tuple[list[_Unit], list[tuple[np.ndarray, Any, Any]]]:
        """The derived entries the read needs, and for sharded arrays the per-shard buffers
        (filled by their inner chunks, then copied to the output as zarr does)."""
        units: list[_Unit] = []
        shard_outputs: list[tuple[np.ndarray, Any, Any]] = []
        sharding = self._sharding()
        codecs = list(self)
        # One derivation per (shape, fill, inner chunk): chunks of one array share most.
        made: dict[tuple, bytes] = {}

        def derived(spec: ArraySpec, dtype: np.dtype, inner: tuple[int, ...] | None) -> bytes:
            memo = (spec.shape, repr(spec.fill_value), dtype.str, inner)
            text = made.get(memo)
            if text is None:
                text = made[memo] = derivation(codecs, spec, dtype, inner)
            return text

        for store, item in node:
            byte_getter, spec, chunk_selection, out_selection, _ = item
            dtype = _decoded_dtype(spec)
            key = store._key(byte_getter.path)
            if sharding is None:
                units.append(
                    _Unit(
                        store, key, derived(spec, dtype, None), spec, dtype,
                        chunk_selection, target, out_selection, drop_axes, item=item,
                    )
                )
                continue
            inner_spec = sharding._get_chunk_spec(spec)
            indexer = get_indexer(
                chunk_selection,
                shape=spec.shape,
                chunk_grid=RegularChunkGrid(chunk_shape=sharding.chunk_shape),
            )
            # As zarr's partial shard decode: the selection's part of the shard, then copied out.
            shard_out = np.empty(indexer.shape, dtype=target.dtype, order="C")
            shard_outputs.append((shard_out, getattr(indexer, "sel_shape", None), out_selection))
            shard = (byte_getter, spec, store)
            for inner, inner_selection, inner_out_selection, _ in indexer:
                units.append(
                    _Unit(
                        store, key, derived(spec, dtype, tuple(inner)), inner_spec, dtype,
                        inner_selection, shard_out, inner_out_selection, (), shard=shard,
                        inner=tuple(inner),
                    )
                )
        return units, shard_outputs

    # -- the node path ----------------------------------------------------------------------------

    async def _read_node(
        self,
        node: list[tuple[ChunkdStore, Any]],
        target: np.ndarray,
        drop_axes: tuple[int, ...],
        out: NDBuffer,
    ) -> None:
        units, shard_outputs = self._units(node, target, drop_axes)
        # Shard indexes read by this read's productions: one per (key, generation).
        indexes: dict[tuple[str, int], asyncio.Task] = {}
        fallbacks: list[_Unit] = []
        loop = asyncio.get_running_loop()
        handlers = []
        by_store: dict[int, list[_Unit]] = {}
        for unit in units:
            by_store.setdefault(id(unit.store), []).append(unit)
        for group in by_store.values():
            client = group[0].store._aio()
            for start in range(0, len(group), _MAX_ITEMS):
                part = group[start : start + _MAX_ITEMS]
                futures = [loop.create_future() for _ in part]
                items = [
                    c.GetItem(u.key, derivation=u.derivation, produce=True) for u in part
                ]
                try:
                    client.read_many_each(items, futures)
                except Exception:  # noqa: BLE001 - the call could not start: zarr's pipeline
                    fallbacks.extend(part)
                    continue
                handlers += [
                    self._one(u, f, indexes, fallbacks) for u, f in zip(part, futures, strict=True)
                ]
        try:
            # Every item to its end (each production published or given up) before an error
            # of one is raised.
            results = await asyncio.gather(*handlers, return_exceptions=True)
        finally:
            for task in indexes.values():
                task.cancel()
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if fallbacks:
            await self._fallback(fallbacks, out, drop_axes)
        for shard_out, sel_shape, out_selection in shard_outputs:
            value = shard_out.reshape(sel_shape) if sel_shape is not None else shard_out
            if drop_axes:
                value = value.squeeze(axis=drop_axes)
            target[out_selection] = value

    async def _one(
        self,
        unit: _Unit,
        future: asyncio.Future,
        indexes: dict[tuple[str, int], asyncio.Task],
        fallbacks: list[_Unit],
    ) -> None:
        """One derived item: a hit placed, a production done, a missing chunk filled; anything
        else joins `fallbacks` (zarr's pipeline)."""
        try:
            result = (await future).pop()
        except NotFoundError:
            # The source is missing (a derived read that may produce answers NOT_FOUND only
            # then): the fill value, as zarr's pipeline makes it.
            self._place(unit, None)
            return
        except ChunkdError:
            # The wait for another producer ran out, or the server cannot derive: decode here.
            fallbacks.append(unit)
            return
        production = getattr(result, "production_id", 0)
        if production:
            decoded = await self._produce(unit, result.generation, production, indexes)
            if decoded is None:
                fallbacks.append(unit)
            else:
                self._place(unit, decoded)
            return
        data = result.data
        if len(data) != unit.dtype.itemsize * int(np.prod(unit.spec.shape)):
            # Not a decoded chunk of this shape (a server that ignored the derivation).
            fallbacks.append(unit)
            return
        self._place(unit, np.frombuffer(data, dtype=unit.dtype).reshape(unit.spec.shape))

    def _place(self, unit: _Unit, decoded: np.ndarray | None) -> None:
        if decoded is None:
            unit.target[unit.target_selection] = fill_value_or_default(unit.spec)
            return
        value = decoded[unit.chunk_selection]
        if unit.drop_axes:
            value = value.squeeze(axis=unit.drop_axes)
        unit.target[unit.target_selection] = value

    async def _produce(
        self,
        unit: _Unit,
        generation: int,
        production: int,
        indexes: dict[tuple[str, int], asyncio.Task],
    ) -> np.ndarray | None:
        """Produces `unit`'s entry from generation `generation` of its source and publishes it;
        gives the production up on any failure (a waiting reader then takes it over). Returns
        the decoded chunk (the fill value's for an empty inner chunk of a shard), or None when
        the source moved on or went away (the caller reads it through zarr's pipeline)."""
        client = unit.store._aio()
        published = False
        try:
            getter = _PinnedGetter(unit.store, unit.key, generation)
            try:
                if unit.shard is None:
                    decoded = await self._decode_chunk(getter, unit.spec)
                else:
                    decoded = await self._decode_inner(unit, getter, indexes)
            except _SourceChanged:
                return None
            chunk = np.empty(unit.spec.shape, dtype=unit.dtype)
            if decoded is None:
                chunk[...] = fill_value_or_default(unit.spec)
            else:
                chunk[...] = decoded
            try:
                await client.put_derived(
                    unit.key,
                    unit.derivation,
                    memoryview(chunk.reshape(-1).view(np.uint8)),
                    source_generation=generation,
                    production_id=production,
                )
                published = True
            except Exception:  # noqa: BLE001 - publishing is the node's gain, not the read's
                # Refused (the source moved on meanwhile) or not sent: the chunk is still the
                # one this read asked for; the finally gives the production up, so that a
                # waiting reader produces it instead of waiting out its deadline.
                pass
            return chunk
        finally:
            if not published:
                try:
                    await client.abandon_derived(unit.key, unit.derivation, production)
                except Exception:  # noqa: BLE001 - the server's deadline ends it then
                    pass

    async def _decode_chunk(self, getter: _PinnedGetter, spec: ArraySpec) -> np.ndarray | None:
        encoded = await getter.get(spec.prototype)
        (decoded,) = await self.decode([(encoded, spec)])
        return None if decoded is None else decoded.as_numpy_array()

    async def _decode_inner(
        self,
        unit: _Unit,
        getter: _PinnedGetter,
        indexes: dict[tuple[str, int], asyncio.Task],
    ) -> np.ndarray | None:
        """An inner chunk of a shard at the production's generation: the shard's index (read
        once per shard and generation by this read), the chunk's byte range, zarr's inner
        pipeline."""
        sharding = self._sharding()
        assert sharding is not None and unit.inner is not None
        _, shard_spec, _ = unit.shard
        chunks_per_shard = sharding._get_chunks_per_shard(shard_spec)
        index_key = (unit.key, getter.generation)
        task = indexes.get(index_key)
        if task is None:
            task = indexes[index_key] = asyncio.ensure_future(
                sharding._load_shard_index_maybe(getter, chunks_per_shard)
            )
        index = await asyncio.shield(task)
        byte_slice = index.get_chunk_slice(unit.inner)
        if byte_slice is None:
            return None  # an empty inner chunk
        encoded = await getter.get(
            unit.spec.prototype, RangeByteRequest(byte_slice[0], byte_slice[1])
        )
        (decoded,) = await sharding.codec_pipeline.decode([(encoded, unit.spec)])
        return None if decoded is None else decoded.as_numpy_array()

    async def _fallback(
        self, units: list[_Unit], out: NDBuffer, drop_axes: tuple[int, ...]
    ) -> None:
        """zarr's pipeline for the units the node could not serve: whole chunks through
        BatchedCodecPipeline.read; inner chunks of shards through the sharding codec's partial
        decode of the shard (the inner chunk's part only), into the shard's buffer."""
        whole = [u.item for u in units if u.shard is None]
        if whole:
            await super().read(whole, out, drop_axes)
        sharding = self._sharding()
        for unit in (u for u in units if u.shard is not None):
            assert sharding is not None and unit.inner is not None
            byte_getter, shard_spec, _ = unit.shard
            # The whole inner chunk, read by zarr's partial decode of the shard (index, then
            # the chunk's bytes), then placed like a hit.
            selection = tuple(
                slice(i * n, (i + 1) * n)
                for i, n in zip(unit.inner, sharding.chunk_shape, strict=True)
            )
            decoded = await sharding._decode_partial_single(byte_getter, selection, shard_spec)
            self._place(unit, None if decoded is None else decoded.as_numpy_array())
