"""The app's process-wide state: the job manager and bounded caches of finished results.

Nothing here belongs to a browser session: sessions keep their own state (model name,
analysis key, selected head, interventions) in ``dcc.Store`` components and pass it in. The
caches only hold immutable results keyed by random ids, so two sessions never see each
other's choices; the model itself is loaded once per process by :func:`workbench.model.load_model`.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.web.jobs import JobManager
from workbench.errors import InputError
from workbench.registry import DEFAULT_MODEL
from workbench.capture import AUTO_PATTERNS_MAX_TOKENS


class ResultCache:
    """A thread-safe LRU of finished results keyed by random ids."""

    def __init__(self, capacity: int, what: str) -> None:
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._capacity = capacity
        self._what = what

    def put(self, value: Any, key: str | None = None) -> str:
        """Store ``value`` (under ``key``, or a new random one); returns the key."""
        key = key or uuid.uuid4().hex
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return key

    def get(self, key: str | None) -> Any:
        """The value stored under ``key``.

        Raises:
            InputError: no key (nothing run yet) or the entry was evicted.
        """
        if not key:
            raise InputError(f"no {self._what} yet: run one first")
        with self._lock:
            if key not in self._items:
                raise InputError(f"this {self._what} has expired from the server cache (it keeps the {self._capacity} "
                                 f"most recent of all sessions; newer ones replaced it): run it again")
            self._items.move_to_end(key)
            return self._items[key]

    @property
    def capacity(self) -> int:
        """How many results it keeps (the oldest goes first)."""
        return self._capacity

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items


@dataclass
class Limits:
    """Input limits (tokens): patterns mode up to ``patterns``, stats mode up to ``stats``."""

    patterns: int = AUTO_PATTERNS_MAX_TOKENS
    stats: int = 8192
    chars_per_token: int = 32   # rejects absurd texts before tokenizing them
    continuation_tokens: int = 20
    topk: int = 10


@dataclass
class Workspace:
    """Process-wide services state (one per app)."""

    default_model: str = DEFAULT_MODEL
    runs_dir: Path = field(default_factory=lambda: Path("runs"))
    limits: Limits = field(default_factory=Limits)
    jobs: JobManager = field(default_factory=JobManager)
    analyses: ResultCache = field(default_factory=lambda: ResultCache(4, "analysis"))
    atlases: ResultCache = field(default_factory=lambda: ResultCache(4, "head atlas"))
    taxonomies: ResultCache = field(default_factory=lambda: ResultCache(4, "long-context run"))
    comparisons: ResultCache = field(default_factory=lambda: ResultCache(8, "intervention comparison"))
    clean_sides: ResultCache = field(default_factory=lambda: ResultCache(8, "clean model output"))  # per analysis
    models_root: Path | None = None  # local model folders clients may load (besides registry names)
    allow_any_model: bool = False    # ``workbench app --allow-any-model``: any folder or hub id
    data_dir: Path | None = None     # ``workbench app --data-dir``: .txt/.jsonl datasets clients may load

    def check_model(self, name: str | None) -> str:
        """The model a client asked for, if this app may load it (:func:`workbench.model_access.check_model_allowed`)."""
        from workbench.model_access import check_model_allowed

        return check_model_allowed(name, models_root=self.models_root, allow_any=self.allow_any_model,
                                   also=(self.default_model,))

    def session_defaults(self) -> dict:
        """Initial per-session state (the ``SESSION`` store)."""
        return {"model": self.default_model, "analysis": None, "selected": None, "prompt": ""}
