"""The data model of a disk plan: a run's steps, a model's in-job layout, the plan itself
(events, peak, notes) and the alternatives offered when it does not fit."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraforge import sizes as S
from loraforge.errors import UserError
from loraforge.sizes import Shard, human

if TYPE_CHECKING:
    from loraforge.plan.simulate import Planner

# rule name -> role; the roles get an in-job model, every other rule just writes its outputs
DEFAULT_ROLES = {"merge_adapter": "merge", "convert_gguf": "convert", "quantize_gguf": "quantize"}
RESULTS_DIR = "results"


class PlanError(UserError, RuntimeError):
    """The planned peak does not fit; the message names the step and what would fit."""

    def __init__(self, message: str, plan: "Plan | None" = None, alternatives: list | None = None):
        super().__init__(message)
        self.plan = plan
        self.alternatives = alternatives or []


def _norm(path: str | os.PathLike) -> str:
    return os.path.normpath(str(path))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# --------------------------------------------------------------------------------------
# the data model
# --------------------------------------------------------------------------------------


@dataclass
class Step:
    """One job: what it reads and writes. `deps` are indices into the step list (None:
    derived from which step writes each input); `temp_inputs` are temp files it reads
    that a job outside this run made (they are deleted after their last consumer too)."""

    rule: str
    model: str | None = None
    outputs: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    temp_outputs: set[str] = field(default_factory=set)
    priority: int = 0
    wildcards: dict = field(default_factory=dict)
    deps: set[int] | None = None
    temp_inputs: set[str] = field(default_factory=set)

    def __post_init__(self):
        self.outputs = [_norm(p) for p in self.outputs]
        self.inputs = [_norm(p) for p in self.inputs]
        self.temp_outputs = {_norm(p) for p in self.temp_outputs}
        self.temp_inputs = {_norm(p) for p in self.temp_inputs}
        if self.model is None and "model" in self.wildcards:
            self.model = str(self.wildcards["model"])

    @property
    def label(self) -> str:
        extra = {k: v for k, v in self.wildcards.items() if k != "model"}
        parts = ([f"model={self.model}"] if self.model else []) + [f"{k}={v}" for k, v in extra.items()]
        return f"{self.rule}[{', '.join(parts)}]" if parts else self.rule


@dataclass
class ModelLayout:
    """What the merge and the conversion of one model move around: the base folder's
    shards (real sizes when it exists, estimates otherwise), its other files, and the
    estimated GGUF size per type."""

    model: str
    base_dir: str
    shards: list[Shard]
    other_bytes: int = 0
    gguf: dict[str, int] = field(default_factory=dict)
    gguf_meta_bytes: int = 0
    arch: "S.Arch | None" = None  # the tensors, for the in-job models of convert and quantize

    def __post_init__(self):
        self.base_dir = _norm(self.base_dir)

    def _types(self, ftype: str) -> dict[str, str] | None:
        if self.arch is None:
            return None
        try:
            return S.gguf_tensor_types(self.arch, ftype)
        except (ValueError, KeyError):
            return None

    def quantize_sequence(self, src_type: str, out_type: str) -> list[tuple[int, int]] | None:
        """(bytes read from the intermediate, bytes written to the quant) of every tensor, in
        the order llama.cpp quantizes them (tensors outside the blocks first, then block by
        block, by name within each); None without the architecture."""
        tin, tout = self._types(src_type), self._types(out_type)
        if tin is None or tout is None:
            return None

        def padded(n: int) -> int:
            return n + (-n) % S.GGUF_ALIGNMENT

        def key(t):
            m = re.match(r"blk\.(\d+)\.", t.name)
            return (int(m.group(1)) if m else -1, t.name)

        tensors = sorted(S.gguf_tensors(self.arch), key=key)
        return [(padded(S.ggml_nbytes(tin[t.name], t.shape)), padded(S.ggml_nbytes(tout[t.name], t.shape)))
                for t in tensors]

    def convert_sequence(self, outtype: str) -> list[tuple[int, list[int]]] | None:
        """The converter's writes in file order: (GGUF bytes of the tensor, indices of the
        shards released right after it: those it is the last reader of). Shards are read in
        order, tensors by name within a shard; a stacked expert tensor is emitted when its last
        expert is read. None without the architecture or the shards' tensor names."""
        types = self._types(outtype)
        if types is None or not self.shards or not all(sh.tensors for sh in self.shards):
            return None
        by_name = {t.name: t for t in S.gguf_tensors(self.arch)}
        pending: dict[str, int] = {}
        order: list[str] = []
        readers: dict[str, set[int]] = defaultdict(set)
        for k, sh in enumerate(self.shards):
            for hf in sorted(sh.tensors):
                g = S.gguf_name(hf, self.arch)
                if g is None or g not in by_name:
                    continue
                readers[g].add(k)
                left = pending.get(g, len(by_name[g].hf_names) or 1) - 1
                pending[g] = left
                if left == 0:
                    order.append(g)
        if not order:
            return None
        last_reader: dict[int, int] = {}
        for j, g in enumerate(order):
            for k in readers[g]:
                last_reader[k] = j
        release_after: list[list[int]] = [[] for _ in order]
        for k in range(len(self.shards)):
            release_after[last_reader.get(k, len(order) - 1)].append(k)
        out = []
        for j, g in enumerate(order):
            n = S.ggml_nbytes(types[g], by_name[g].shape)
            out.append((n + (-n) % S.GGUF_ALIGNMENT, release_after[j]))
        return out

    @property
    def base_bytes(self) -> int:
        return self.other_bytes + sum(s.bytes for s in self.shards)

    def merged_bytes(self, mode: str) -> int:
        """New bytes merged/ takes: in link mode untargeted shards are hard links (free)."""
        if mode == "link":
            return self.other_bytes + sum(s.bytes for s in self.shards if s.targeted)
        return self.base_bytes

    @property
    def max_targeted_shard(self) -> int:
        return max((s.bytes for s in self.shards if s.targeted), default=0)

    @property
    def max_targeted_pair(self) -> int:
        """The most bytes two consecutive rewritten shards take (a consume-mode merge writes
        one while the one before is being made durable)."""
        costs = [s.bytes if s.targeted else 0 for s in self.shards]
        pairs = [a + b for a, b in zip(costs, costs[1:]) if a and b]
        return max(pairs + costs, default=0)


@dataclass
class Event:
    """One row of the timeline: after `event` of the step at `step` (1-based position in
    run order; 0 = before the run), `used` bytes are on disk."""

    step: int
    rule: str
    model: str
    event: str
    path: str
    delta: int
    used: int
    peak: int
    run: int = 1


@dataclass
class Plan:
    order: list[Step]
    events: list[Event]
    initial: int
    peak: int
    peak_event: Event
    final: int
    merge_mode: str
    label: str = ""
    planner: "Planner | None" = None
    final_present: dict[str, int] = field(default_factory=dict)
    quota: int | None = None
    free: int | None = None
    notes: list[str] = field(default_factory=list)
    feasible: bool = True
    consumed: set[str] = field(default_factory=set)

    @property
    def peak_bytes(self) -> int:
        return self.peak

    @property
    def peak_step(self) -> Step | None:
        k = self.peak_event.step
        return self.order[k - 1] if 0 < k <= len(self.order) else None

    def describe_peak(self) -> str:
        ev = self.peak_event
        if ev.step == 0:
            return f"{human(self.peak)} before any job (files already on disk)"
        where = f"step {ev.step} {self.order[ev.step - 1].label}" if ev.run == 1 and ev.step <= len(self.order) else f"run {ev.run} step {ev.step} {ev.rule}[model={ev.model}]"
        return f"{human(self.peak)} at {where}: {ev.event}"


@dataclass
class Alternative:
    name: str
    hint: str
    peak: int | None
    fits: bool
    plan: Plan | None = None
    note: str = ""
