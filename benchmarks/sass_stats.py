"""What a cubin's SASS says about a kernel, without a GPU: loops, instruction counts, tensor cores, async copies.

  sass_text(cubin_path, cuobjdump) -> str              `cuobjdump -sass`
  resource_usage(cubin_path, cuobjdump) -> dict        REG / STACK / SHARED / LOCAL of `--dump-resource-usage`
  analyze(sass) -> SassStats                           instructions, loops (back edges), the hot loop
  SassStats.executed(trips) -> float                   instructions one thread runs when loop i (innermost
                                                       first, as in .loops) runs trips[i] times (default 1)

A loop is the address range of a backward branch. The hot loop is the merged range of all loops that overlap the
loop holding the first matrix instruction (HGMMA / HMMA; pipelined loops are rotated, so one loop can show two back
edges). Its "fast path" drops the largest forward-branched block inside it: the code a uniform `if` skips (for
example the candidate appends of a tile without candidates).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

TENSOR_CORE_OPS = ("HGMMA", "HMMA", "QGMMA", "IMMA")
ASYNC_COPY_OPS = ("LDGSTS", "UTMALDG", "UBLKCP", "UTMASTG", "UTMAPF")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s*(.*?)\s*;", re.M)
_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+(?:`\()?(0x[0-9a-f]+)")


def sass_text(cubin_path: str, cuobjdump: str) -> str:
    return subprocess.run([cuobjdump, "-sass", cubin_path], capture_output=True, text=True, check=True).stdout


def _dump_resource_usage(cubin_path: str, cuobjdump: str) -> str:
    return subprocess.run([cuobjdump, "--dump-resource-usage", cubin_path], capture_output=True, text=True,
                          check=True).stdout


def _usage_fields(text: str) -> dict:
    return {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def resource_usage(cubin_path: str, cuobjdump: str) -> dict:
    """{reg, stack, shared, local} of a one-kernel cubin (a Triton compilation)."""
    return _usage_fields(_dump_resource_usage(cubin_path, cuobjdump))


def resource_usage_by_function(cubin_path: str, cuobjdump: str) -> dict:
    """{mangled name: {reg, stack, shared, local}} of every kernel of a cubin (the extension's)."""
    text = _dump_resource_usage(cubin_path, cuobjdump)
    return {name: _usage_fields(fields) for name, fields in re.findall(r"Function (\S+):\s*\n\s*(.*)", text)}


def opcode(text: str) -> str:
    parts = text.split()
    op = parts[1] if parts and parts[0].startswith("@") and len(parts) > 1 else (parts[0] if parts else "")
    return op.split(".")[0]


@dataclass
class SassStats:
    instructions: list  # (address, text)
    loops: list = field(default_factory=list)  # (start, end) address ranges, innermost (shortest) first
    hot: tuple | None = None  # merged hot-loop range
    tensor_core: str | None = None
    async_copy: str | None = None
    local_memory_ops: int = 0  # LDL / STL: spills or local arrays

    def count(self, lo: int, hi: int) -> int:
        return sum(1 for a, _ in self.instructions if lo <= a <= hi)

    def opcodes(self, lo: int, hi: int) -> dict:
        ops: dict = {}
        for a, text in self.instructions:
            if lo <= a <= hi:
                op = opcode(text)
                ops[op] = ops.get(op, 0) + 1
        return dict(sorted(ops.items(), key=lambda kv: -kv[1]))

    def hot_count(self) -> int:
        return self.count(*self.hot) if self.hot else 0

    def hot_fast_path_count(self) -> int:
        if not self.hot:
            return 0
        lo, hi = self.hot
        skipped = 0
        for a, text in self.instructions:
            m = _BRANCH.search(text)
            if lo <= a <= hi and m and a < int(m.group(1), 16) <= hi:
                skipped = max(skipped, self.count(a + 1, int(m.group(1), 16) - 1))
        return self.hot_count() - skipped

    def executed(self, trips: list | None = None) -> float:
        """Instructions one thread executes: straight-line code once, loop i's body trips[i] times."""
        total = float(len(self.instructions))
        for i, (lo, hi) in enumerate(self.loops):
            n = trips[i] if trips and i < len(trips) else 1
            # Inner loops were already scaled; an enclosing loop repeats its whole body, inner work included.
            total += (n - 1) * self._scaled_body(i, trips)
        return total

    def _scaled_body(self, i: int, trips) -> float:
        lo, hi = self.loops[i]
        body = float(self.count(lo, hi))
        for j, (ilo, ihi) in enumerate(self.loops[:i]):
            if lo <= ilo and ihi <= hi and (ilo, ihi) != (lo, hi):
                n = trips[j] if trips and j < len(trips) else 1
                body += (n - 1) * self.count(ilo, ihi)
        return body


def analyze(sass: str) -> SassStats:
    instrs = [(int(a, 16), text) for a, text in _INSTR.findall(sass)]
    stats = SassStats(instrs)
    for a, text in instrs:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < a:
            stats.loops.append((int(m.group(1), 16), a))
    stats.loops.sort(key=lambda r: r[1] - r[0])
    ops = [opcode(t) for _, t in instrs]
    stats.tensor_core = next((op for op in TENSOR_CORE_OPS if op in ops), None)
    stats.async_copy = next((op for op in ASYNC_COPY_OPS if op in ops), None)
    stats.local_memory_ops = sum(op in ("LDL", "STL") for op in ops)
    mma_at = next((a for a, t in instrs if opcode(t) in TENSOR_CORE_OPS), None)
    if mma_at is not None:
        holding = [r for r in stats.loops if r[0] <= mma_at <= r[1]]
        if holding:
            lo, hi = max(holding, key=lambda r: r[1] - r[0])
            changed = True
            while changed:  # merge the rotated halves of the same loop
                changed = False
                for r0, r1 in stats.loops:
                    if r0 <= hi and r1 >= lo and (r0 < lo or r1 > hi):
                        lo, hi, changed = min(lo, r0), max(hi, r1), True
            stats.hot = (lo, hi)
    return stats
