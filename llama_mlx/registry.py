"""The models a server can serve: names to lazily started `Engine`s, loaded on demand, evicted when idle.

    registry = ModelRegistry(lambda path: Engine(lambda: load(path)), max_loaded=2, max_bytes=8 << 30,
                             keep_alive=300)
    registry.add("SmolLM2-135M-Instruct", path, default=True)      # preloaded (starts loading now)
    engine = await registry.engine("mlx-community/Llama-3.2-1B-Instruct-4bit")   # loads it, evicting if need be

A name is what `llama-mlx list` shows (a folder of the weights folder, a repo of the Hugging Face
cache), a preloaded model's name, or a path; a hub id resolves only through the cache (nothing is
downloaded at request time). An unknown name raises `UnknownModelError`. Each model has its own
engine (its own worker thread), so one model loading never stalls another's streams. Over
`max_loaded` models or `max_bytes` of weights, the least recently used idle model (no request
running or waiting) is unloaded before another loads; `keep_alive` seconds after its last use an
idle model is unloaded (`sweep`, called periodically by the server). A registry built with no
engine factory serves only the models added to it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .engine import Engine
from .errors import LlamaMLXError, ModelNotFoundError

__all__ = ["ModelInfo", "ModelLoadError", "ModelRegistry", "RegistryBusyError", "UnknownModelError"]

# A model handed to a request counts as busy this long, so that it is not evicted between the
# handler getting its engine and submitting to it.
_HANDOFF_GRACE = 1.0


class UnknownModelError(ModelNotFoundError):
    """No model of that name can be served (not listed, not a path, not in the Hugging Face cache)."""


class ModelLoadError(LlamaMLXError):
    """The model exists but failed to load."""


class RegistryBusyError(LlamaMLXError):
    """Every loaded model is busy and none can be unloaded to make room for another."""


@dataclass
class ModelInfo:
    """One servable model, as `ModelRegistry.list` reports it."""

    name: str
    path: str
    size_bytes: int  # on disk
    loaded: bool  # its engine is started (loading or ready)
    ready: bool
    loaded_bytes: int  # its weights in memory (0 when not loaded)
    last_used: Optional[float]  # time.time() of its last use, None if never
    expires_at: Optional[float]  # time.time() when keep-alive unloads it, None for never or not loaded
    default: bool = False
    preloaded: bool = False


class _Slot:
    def __init__(self, name: str, path: Path, size: int, *, preloaded: bool = False):
        self.name, self.path, self.size, self.preloaded = name, path, size, preloaded
        self.engine: Optional[Engine] = None
        self.last_used: Optional[float] = None  # time.monotonic()
        self.handed: float = 0.0
        self.keep_alive: Optional[float] = None  # per-slot override of the registry's; <0: forever
        self.weights: int = 0
        self.make: Optional[Callable[[Optional[Path]], Engine]] = None  # its own engine builder, if any


def _key(path: Path, adapter: Optional[Path | str] = None) -> str:
    # An adapter is part of a model's identity: the same weights without it are another model.
    return os.path.realpath(path) + (f"+adapter:{os.path.realpath(adapter)}" if adapter is not None else "")


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _weights_bytes(engine: Engine) -> int:
    model = engine.model
    if model is None:
        return 0
    from mlx.utils import tree_flatten

    try:
        return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    except Exception:  # noqa: BLE001 - a model changing under us: report nothing rather than fail
        return 0


class ModelRegistry:
    """Named models, each served by its own `Engine`, started on first use (see the module's docstring).

    factory(path) returns a new, unstarted Engine for the model at `path` (None: only added models).
    max_loaded: most engines started at once (None: no bound). max_bytes: bound on the loaded models'
    weights (a model not loaded yet counts its size on disk). keep_alive: seconds an idle model stays
    loaded (None or negative: forever; 0: unloaded as soon as it is idle).
    """

    def __init__(self, factory: Optional[Callable[[Path], Engine]] = None, *, max_loaded: Optional[int] = None,
                 max_bytes: Optional[int] = None, keep_alive: Optional[float] = None,
                 busy_timeout: float = 120.0):
        if max_loaded is not None and max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.factory, self.max_loaded, self.max_bytes = factory, max_loaded, max_bytes
        self.keep_alive = float(keep_alive) if keep_alive is not None else None
        self.busy_timeout = busy_timeout
        self._slots: dict[str, _Slot] = {}  # by real path
        self._names: dict[str, str] = {}  # added names -> real path
        self._default: Optional[str] = None
        self._lock = threading.RLock()
        self._alock: Optional[asyncio.Lock] = None
        self.loads = 0
        self.unloads = 0

    # -- adding and naming

    def add(self, name: str, path: Optional[Path | str], *, engine: Optional[Engine] = None, default: bool = False,
            start: bool = True, make: Optional[Callable[[Optional[Path]], Engine]] = None,
            adapter: Optional[Path | str] = None) -> Engine:
        """Serve the model at `path` as `name` (preloaded: its engine is started now unless `start` is
        False; `engine` when given is used, else `make(path)`'s, else the factory's). The first added
        model is the default. `make` also rebuilds it after an unload (else the factory does, given a
        path). `path` may be None with an `engine` (then it is known by its name only). A model that
        nothing can rebuild is never unloaded. `adapter`: the adapter folder its engine applies (`make`
        builds it so): the same path without it stays a model of its own."""
        if path is None and engine is None and make is None:
            raise ValueError("a model needs a path, an engine or a maker")
        with self._lock:
            key = _key(Path(path), adapter) if path is not None else "engine:" + name
            slot = self._slots.get(key) or _Slot(name, Path(path) if path is not None else None,
                                                 _disk_size(Path(path)) if path is not None else 0, preloaded=True)
            slot.preloaded = True
            self._slots[key] = slot
            self._names[name] = key
            if default or self._default is None:
                self._default = key
            slot.make = make or slot.make
            if slot.engine is None:
                if engine is None:
                    engine = self._build(slot)
                    if engine is None:
                        raise ValueError("an engine, a maker or a factory is needed")
                slot.engine = engine.start() if start else engine
                self.loads += 1
            slot.last_used = time.monotonic()
            return slot.engine

    def _build(self, slot: _Slot) -> Optional[Engine]:
        if slot.make is not None:
            return slot.make(slot.path)
        if self.factory is not None and slot.path is not None:
            return self.factory(slot.path)
        return None

    def _pinned(self, slot: _Slot) -> bool:
        """Whether nothing could load `slot`'s model again (so it is never unloaded)."""
        return slot.make is None and (self.factory is None or slot.path is None)

    def default_engine(self) -> Optional[Engine]:
        """The default model's engine (None while it is unloaded)."""
        slot = self._slots.get(self._default) if self._default else None
        return slot.engine if slot else None

    def _slot_of(self, engine: Engine):
        with self._lock:
            return next((slot for slot in self._slots.values() if slot.engine is engine), None)

    def name_of(self, engine: Engine) -> Optional[str]:
        """The name the model served by `engine` answers to."""
        slot = self._slot_of(engine)
        return slot.name if slot else None

    def path_of(self, engine: Engine) -> Optional[Path]:
        """Where the model served by `engine` lives (None for one added by engine only)."""
        slot = self._slot_of(engine)
        return slot.path if slot else None

    def engines(self) -> dict[str, Engine]:
        """The started engines by model name."""
        with self._lock:
            return {s.name: s.engine for s in self._slots.values() if s.engine is not None}

    def _resolve(self, name: Optional[str]) -> tuple[str, Optional[Path], str]:
        """(name, path, key) of the model `name` designates (None or "": the default); no download, no
        loading. Raises UnknownModelError."""
        with self._lock:
            if not name:
                if self._default is None:
                    raise UnknownModelError("no default model")
                slot = self._slots[self._default]
                return slot.name, slot.path, self._default
            if name in self._names:
                key = self._names[name]
                return self._slots[key].name, self._slots[key].path, key
        if self.factory is None:
            raise UnknownModelError(f"{name}: no such model (this server serves {', '.join(sorted(self._names))})")
        path = _find_local(name)
        if path is None:
            raise UnknownModelError(f"{name}: no such model in the weights folder or the Hugging Face cache, "
                                    "and no such path (see llama-mlx list; llama-mlx pull fetches one)")
        key = _key(path)
        with self._lock:  # a path or a second name of a known model answers to the known model
            slot = self._slots.get(key)
            if slot is not None:
                self._names.setdefault(name, key)
                return slot.name, slot.path, key
        return name, path, key

    # -- listing

    def list(self, *, listed: bool = True) -> list[ModelInfo]:
        """Every servable model: the default, the other added or used ones, then (`listed`, and when the
        registry has a factory) those of the weights folder and the Hugging Face cache that
        `llama-mlx list` shows, each once."""
        out: list[ModelInfo] = []
        seen: set[str] = set()
        with self._lock:
            slots = list(self._slots.items())
        for key, slot in sorted(slots, key=lambda ks: (ks[0] != self._default, not ks[1].preloaded)):
            out.append(self._info(slot, key))
            seen.add(key)
        if listed and self.factory is not None:
            for name, path, size in _listed():
                if _key(path) in seen or name in self._names:  # (a name served with an adapter answers so)
                    continue
                seen.add(_key(path))
                out.append(ModelInfo(name, str(path), size, False, False, 0, None, None))
        return out

    def _info(self, slot: _Slot, key: str) -> ModelInfo:
        engine = slot.engine
        if engine is not None and engine.ready and not slot.weights:
            slot.weights = _weights_bytes(engine)
        wall = time.time() - time.monotonic()
        expires = None
        keep = self._keep_alive(slot)
        if engine is not None and keep is not None and keep >= 0 and slot.last_used is not None:
            expires = wall + slot.last_used + keep
        return ModelInfo(slot.name, str(slot.path or ""), slot.size, engine is not None, bool(engine and engine.ready),
                         slot.weights if engine is not None else 0,
                         None if slot.last_used is None else wall + slot.last_used, expires,
                         default=key == self._default, preloaded=slot.preloaded)

    # -- using, loading, unloading

    def _keep_alive(self, slot: _Slot) -> Optional[float]:
        return slot.keep_alive if slot.keep_alive is not None else self.keep_alive

    @staticmethod
    def _busy(slot: _Slot) -> bool:
        engine = slot.engine
        if engine is None:
            return False
        if time.monotonic() - slot.handed < _HANDOFF_GRACE or not engine._ready.is_set():
            return True  # just handed out, or still loading
        with engine._cond:
            return bool(engine._active or engine._waiting or getattr(engine, "_calls", None))

    def _loaded_bytes(self, exclude: Optional[_Slot] = None) -> int:
        return sum((s.weights or s.size) for s in self._slots.values() if s.engine is not None and s is not exclude)

    async def engine(self, name: Optional[str], *, keep_alive: Optional[float] = None) -> Engine:
        """The engine serving `name` (None: the default), started if need be (unloading idle models to
        make room) and loaded: waits without blocking the event loop. keep_alive: seconds this model
        stays loaded once idle from now on (ollama's per-request keep_alive; negative: forever).

        Raises UnknownModelError, ModelLoadError, RegistryBusyError."""
        if name and name not in self._names:  # a listing or cache lookup: off the event loop
            name, path, key = await asyncio.to_thread(self._resolve, name)
        else:
            name, path, key = self._resolve(name)
        slot = self._slots.get(key)
        engine = slot.engine if slot is not None else None
        if engine is None:
            engine, slot = await self._start(key, name, path)
        if keep_alive is not None:
            slot.keep_alive = float(keep_alive)
        slot.handed = slot.last_used = time.monotonic()
        while not engine._ready.is_set():
            await asyncio.sleep(0.02)
        slot.handed = slot.last_used = time.monotonic()
        if engine.load_error is not None:
            with self._lock:
                if slot.engine is engine:
                    slot.engine = None
            e = engine.load_error
            raise ModelLoadError(f"{name}: cannot load it: {e}") from None
        if not slot.weights:
            slot.weights = _weights_bytes(engine)
        return engine

    async def _start(self, key: str, name: str, path: Optional[Path]) -> tuple[Engine, _Slot]:
        """Start the engine of a model not loaded (unless another request just did)."""
        if self._alock is None:
            self._alock = asyncio.Lock()
        # One model made room for and started at a time; a loaded model's requests never wait here.
        async with self._alock:
            if key not in self._slots:
                size = await asyncio.to_thread(_disk_size, path)
                with self._lock:
                    self._slots.setdefault(key, _Slot(name, path, size))
            slot = self._slots[key]
            slot.handed = time.monotonic()
            if slot.engine is None:
                if self._pinned(slot):
                    raise ModelLoadError(f"{name}: unloaded, and this server cannot load it again")
                await self._make_room(slot)
                with self._lock:
                    engine = self._build(slot)
                    # A request waits on this load: a warm-up (tracing every batch size, up to 30 s
                    # on a GPU) would only add to its TTFT. Its requests trace what they run.
                    engine.warm_up = False
                    slot.engine = engine.start()
                    slot.weights = 0
                    self.loads += 1
            return slot.engine, slot

    async def _make_room(self, slot: _Slot) -> None:
        """Unload least recently used idle models until `slot`'s model fits the bounds."""
        if self.max_bytes is not None and slot.size > self.max_bytes:
            raise RegistryBusyError(f"{slot.name}: its {slot.size} bytes are over the loaded-model budget "
                                    f"({self.max_bytes} bytes)")
        deadline = time.monotonic() + self.busy_timeout
        while True:
            with self._lock:
                loaded = [s for s in self._slots.values() if s.engine is not None and s is not slot]
                over_count = self.max_loaded is not None and len(loaded) + 1 > self.max_loaded
                over_bytes = self.max_bytes is not None and self._loaded_bytes() + slot.size > self.max_bytes
                if not over_count and not over_bytes:
                    return
                idle = sorted((s for s in loaded if not self._busy(s) and not self._pinned(s)),
                              key=lambda s: s.last_used or 0.0)
                victim = idle[0] if idle else None
                if victim is not None:
                    engine = self._detach(victim)
            if victim is not None:
                await asyncio.to_thread(engine.close)
                continue
            if time.monotonic() > deadline:
                raise RegistryBusyError(f"{slot.name}: every loaded model is busy and none can be unloaded to "
                                        "make room (--max-loaded-models, --max-loaded-bytes); try again later")
            await asyncio.sleep(0.05)

    def _detach(self, slot: _Slot) -> Engine:
        engine, slot.engine, slot.weights = slot.engine, None, 0
        self.unloads += 1
        return engine

    async def unload(self, name: Optional[str]) -> bool:
        """Unload `name` once its running requests finish (new ones load it again); False if it was not
        loaded (or nothing could load it again)."""
        name, path, key = self._resolve(name)
        with self._lock:
            slot = self._slots.get(key)
            if slot is None or slot.engine is None or self._pinned(slot):
                return False
            engine = self._detach(slot)
        await asyncio.to_thread(engine.close)
        return True

    async def sweep(self) -> list[str]:
        """Unload the idle models whose keep-alive has passed; returns their names. A busy model's
        keep-alive counts from when it was last seen busy."""
        now = time.monotonic()
        closing = []
        with self._lock:
            for slot in self._slots.values():
                if slot.engine is None or self._pinned(slot):
                    continue
                if self._busy(slot):
                    slot.last_used = now
                    continue
                keep = self._keep_alive(slot)
                if keep is not None and keep >= 0 and slot.last_used is not None and now - slot.last_used >= keep:
                    closing.append((slot.name, self._detach(slot)))
        for _, engine in closing:
            await asyncio.to_thread(engine.close)
        return [name for name, _ in closing]

    def close(self) -> None:
        """Close every engine (each drains its requests first)."""
        with self._lock:
            engines = [self._detach(s) for s in self._slots.values() if s.engine is not None]
        for engine in engines:
            engine.close()


# -- what `llama-mlx list` shows, and the paths names designate (never downloading)


def _listed() -> list[tuple[str, Path, int]]:
    from .store import list_models

    out = []
    for e in list_models():
        if e.layout == "other":
            continue
        path = e.path if e.place == "weights" else _cached(e.name)
        if path is not None:
            out.append((e.name, path, e.size_bytes))
    return out


def _cached(name: str) -> Optional[Path]:
    """The local snapshot (or .gguf) of a hub id in the Hugging Face cache; None if not there whole."""
    from . import hub

    try:
        spec = hub.parse_hub_id(name)
        if spec is None:
            return None
        found = hub._from_cache(spec, authoritative=True)
    except LlamaMLXError:
        return None
    return found[0] if found is not None else None


def _find_local(name: str) -> Optional[Path]:
    from .resolve import DEFAULT_MODEL, weights_dir

    home = weights_dir()
    given = Path(name).expanduser()
    bare = given.name == name and name not in (".", "..")
    if bare and (home / name).exists():
        return home / name
    if bare and name == DEFAULT_MODEL:
        return None  # not converted yet: the default model is fetched only at startup
    from . import hub

    try:
        spec = hub.parse_hub_id(name)
    except LlamaMLXError:
        spec = None
    if spec is not None and not given.exists():
        if spec.pick is None and (home / spec.repo_id).exists():
            return home / spec.repo_id
        return _cached(name)
    if not bare and given.exists():
        return given
    return None
