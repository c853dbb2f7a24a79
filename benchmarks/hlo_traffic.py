"""Where a compiled step moves its bytes: a rough count from optimized HLO text, per kernel and kind.

    python benchmarks/hlo_traffic.py FILE [--top 25]

FILE is an optimized module as XLA writes it (`XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text`:
DIR/module_*.jit_train_step.*after_optimizations.txt; benchmarks/gpu.sh keeps the GPU's in
$OUT/hlo-*), or `compiled.as_text()` of a jitted step. Each top-level kernel of the entry
computation and of every while loop it runs (times the loop's trip count) counts the bytes of its
operands and results; an in-place dynamic-update-slice counts its update twice, a dynamic slice its
result twice, a fusion reading one slice of a stacked [trips, ...] buffer that slice. A count of
bytes, not a timing: kernels that reuse the cache count in full, and matmuls are bound by FLOPs.
"""

from __future__ import annotations

import argparse
import collections
import re

BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
         "f64": 8}
SHAPE = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([\d,]*)\]")
COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")
INSTRUCTION = re.compile(r"^(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
FREE = {"get-tuple-element", "parameter", "tuple", "constant", "bitcast", "while", "after-all", "partition-id"}


def nbytes(shape_text: str) -> int:
    total = 0
    for dtype, dims in SHAPE.findall(shape_text):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * BYTES[dtype]
    return total


def computations(text: str) -> tuple[str, dict[str, list[tuple[str, str, str, str]]]]:
    """(entry name, {computation: [(name, shape, opcode, rest of line)]})."""
    comps, current, entry = {}, None, None
    for line in text.splitlines():
        header = COMPUTATION.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            comps[current] = []
            entry = current if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current and (inst := INSTRUCTION.match(line.strip())):
            comps[current].append(inst.groups())
    return entry, comps


def traffic(text: str) -> list[tuple[int, str, str, str, str, int]]:
    """(bytes, kind, computation, instruction, shape, times run) of every counted kernel."""
    entry, comps = computations(text)
    times, trips, order = {entry: 1}, {}, [entry]
    for comp in order:  # grows as while loops are found
        for name, shape, op, rest in comps[comp]:
            if op == "while":
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                for key in ("body", "condition"):
                    target = re.search(key + r"=%?([\w.\-]+)", rest)
                    if target and target.group(1) not in times:
                        times[target.group(1)] = times[comp] * (int(trip.group(1)) if trip else 1)
                        trips[target.group(1)] = int(trip.group(1)) if trip else 1
                        order.append(target.group(1))
    rows = []
    for comp in order:
        shapes = {name: shape for name, shape, _, _ in comps[comp]}
        for name, shape, op, rest in comps[comp]:
            if op in FREE:
                continue
            out = nbytes(shape)
            ins = []
            for operand in re.findall(r"%([\w.\-]+)", rest.split(")")[0]):
                size, lead = nbytes(shapes.get(operand, "")), re.search(r"\[(\d+),", shapes.get(operand, ""))
                if trips.get(comp, 1) > 1 and lead and int(lead.group(1)) == trips[comp] and size > 4 * out:
                    size //= trips[comp]  # one slice of a stacked buffer
                ins.append(size)
            if "dynamic_update_slice" in name:
                moved = 2 * (sum(ins) - max(ins, default=0))
            elif "dynamic_slice" in name:
                moved = 2 * out
            else:
                moved = out + sum(ins)
            kind = ("matmul" if "gemm" in name or "cublas" in rest[:400] else "attention" if "cudnn" in rest
                    else "copy" if op == "copy" else "other")
            rows.append((moved * times[comp], kind, comp, name, shape, times[comp]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    rows = traffic(open(args.file).read())
    kinds = collections.Counter()
    for moved, kind, *_ in rows:
        kinds[kind] += moved
    by_kind = ", ".join(f"{kind} {moved / 1e9:.1f} GB" for kind, moved in kinds.most_common())
    print(f"{sum(kinds.values()) / 1e9:.1f} GB in all: {by_kind}")
    for moved, kind, comp, name, shape, times in sorted(rows, reverse=True)[:args.top]:
        print(f"{moved / 1e9:8.2f} GB  x{times:<4} {kind:9} {comp[:24]:24} {name[:40]:40} {shape[:70]}")


if __name__ == "__main__":
    main()
