"""Facts read from compiled GPU code without a GPU: how wide the packed-weight loads are, local memory, MMA.

Used by ``python -m triton_kernels.compile_check`` on NVIDIA targets. Two sources:

- the PTX, for *which* loads fetch the packed weights: every ``ld.global`` whose address depends
  (through the register def-use chains, and through shared memory: a value stored there with some
  width reaches every shared load of that width) on the kernel parameter that holds the weight pointer;
  its vector width (``.v4.b32`` = 128 bits, ...) is the width ptxas keeps in the SASS;
- the SASS (the bundled ``cuobjdump -sass`` on the cubin), for what the GPU executes: local-memory
  instructions (``LDL``/``STL``: spills or stack arrays), tensor-core instructions (``HMMA`` on
  sm_80, ``HGMMA`` on sm_90a, or ``HMMA`` there too for small tiles) and all global loads by width.

The widths are per thread and per instruction, counted statically (each appears once in the loop
body), so "weight bytes per load" is the average bytes one packed-weight load instruction brings in.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

_REG = re.compile(r"%[a-z]+\d+")
_PARAM = re.compile(r"_param_(\d+)")
_VEC = re.compile(r"ld\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](\d+)")


def ptx_weight_loads(ptx: str, weight_params: tuple[int, ...]) -> list[int]:
    """Widths in bits of the ``ld.global`` instructions whose address derives from ``weight_params``."""
    deps: dict[str, set] = {}
    loads = []
    for raw in ptx.splitlines():
        line = raw.strip()
        if not line or line.startswith(("//", ".", "{", "}", "$")) or line.endswith(":"):
            continue
        line = re.sub(r"^@!?%p\d+\s+", "", line)
        op, _, rest = line.partition(" ")
        regs = _REG.findall(rest)
        if op.startswith("ld.param"):
            m = _PARAM.search(rest)
            if regs and m:
                deps.setdefault(regs[0], set()).add(("param", int(m.group(1))))
            continue
        if op.startswith("cp.async") and "global" in op:
            # asynchronous global -> shared copy (the pipelined loads of tl.dot operands): [dst], [src], bytes
            m = re.search(r"\[[^]]*\],\s*\[\s*(%[a-z]+\d+)[^]]*\],\s*(0x[0-9a-f]+|\d+)", rest)
            if m:
                loads.append((m.group(1), 8 * int(m.group(2), 0)))
            continue
        if op.startswith(("st.shared", "ld.shared")):
            # Layout conversions pass values (gathered weight addresses too) through shared memory:
            # whatever is stored with one width flows to every load of that width (conservative).
            m = re.search(r"\.[bfsu](\d+)$", op.split(" ")[0])
            slot = f"%smem{m.group(1) if m else ''}"
            if op.startswith("st.") and regs:
                deps.setdefault(slot, set()).update(("reg", r) for r in regs[1:])
            else:
                for d in regs[:-1] or regs:  # every destination (vector loads), not the address
                    deps.setdefault(d, set()).add(("reg", slot))
            continue
        if op.startswith(("st.", "red.", "atom.", "bar", "ret", "bra", "cp.", "mbarrier", "fence")):
            continue
        if op.startswith("ld.global"):
            addr = re.search(r"\[\s*(%[a-z]+\d+)", rest)
            m = _VEC.match(op)
            if addr and m:
                loads.append((addr.group(1), int(m.group(1) or 1) * int(m.group(2))))
            # A value loaded from global memory is data, not an address: a load indexed by it (a table
            # lookup by decoded codes, a gather by a loaded index list) counts for the parameter its own
            # address is computed from, not for the one the index came from.
            continue
        if regs:
            dst, srcs = regs[0], regs[1:]
            deps.setdefault(dst, set()).update(("reg", s) for s in srcs)
    cache: dict[str, frozenset] = {}

    def params_of(reg: str) -> frozenset:
        if reg in cache:
            return cache[reg]
        cache[reg] = frozenset()  # cycles (loop-carried registers) resolve to what is found so far
        found: set = set()
        stack, seen = [reg], set()
        while stack:
            r = stack.pop()
            if r in seen:
                continue
            seen.add(r)
            for kind, v in deps.get(r, ()):
                if kind == "param":
                    found.add(v)
                elif v:
                    stack.append(v)
        cache[reg] = frozenset(found)
        return cache[reg]

    return [w for addr, w in loads if params_of(addr) & set(weight_params)]


def sass_counts(cubin: bytes, cuobjdump: str) -> Counter:
    """Instruction counts by opcode (with width suffixes) from ``cuobjdump -sass``."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", out)
    return Counter(ops)


def sass_facts(counts: Counter) -> dict:
    ldg = {k: v for k, v in counts.items() if k.startswith("LDG")}
    local = sum(v for k, v in counts.items() if k.startswith(("LDL", "STL")))
    mma = sum(v for k, v in counts.items() if k.startswith(("HMMA", "HGMMA")))
    return {"sass_global_loads": " ".join(f"{k}:{v}" for k, v in sorted(ldg.items())),
            "local_mem_instrs": local, "tensor_core_instrs": mma}


def weight_load_facts(widths: list[int]) -> dict:
    if not widths:
        return {"weight_loads": 0, "weight_load_bits": "", "weight_bytes_per_load": ""}
    return {"weight_loads": len(widths), "weight_load_bits": "/".join(str(w) for w in sorted(set(widths))),
            "weight_bytes_per_load": round(sum(widths) / 8 / len(widths), 1)}
