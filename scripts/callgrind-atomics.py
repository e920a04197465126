#!/usr/bin/env python3
"""Two costs per request that instruction counts do not weigh, from callgrind files written
with --dump-instr=yes (scripts/gateway-instructions.sh --atomics):

- locked instructions: executions of `lock`-prefixed instructions and of `xchg` with a memory
  operand (locked by the processor), found by disassembling each object the files name
  (objdump) at the addresses callgrind counted;
- clock readings: calls to clock_gettime and gettimeofday.

Usage: callgrind-atomics.py REQUESTS FILE...
"""
import collections
import re
import subprocess
import sys

NAMED = re.compile(r"\((\d+)\)(?: (.*))?")
CLOCK = re.compile(r"^(__)?(clock_gettime|gettimeofday)\b")


def locked_addresses(obj):
    """Addresses of the locked instructions of object file `obj`."""
    try:
        out = subprocess.run(
            ["objdump", "-d", "--no-show-raw-insn", obj],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    found = set()
    for line in out.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(lock\b|xchg\s+(\S+))", line)
        # (`xchg` between registers is not locked: `xchg %ax,%ax` is a no-op filler)
        if m and (m.group(2) == "lock" or "(" in (m.group(3) or "")):
            found.add(int(m.group(1), 16))
    return found


def main():
    requests = float(sys.argv[1])
    executed = collections.Counter()  # (object, address) -> executions
    clock_calls = 0
    for path in sys.argv[2:]:
        names = {"ob": {}, "fn": {}}

        def name(kind, text):
            m = NAMED.match(text)
            if not m:
                return text
            if m.group(2):
                names[kind][m.group(1)] = m.group(2)
            return names[kind].get(m.group(1), m.group(1))

        obj, callee, in_call, last = None, "", False, 0
        with open(path) as f:
            for line in f:
                line = line.rstrip("\n")
                if line.startswith("ob="):
                    obj = name("ob", line[3:])
                elif line.startswith(("cob=",)):
                    name("ob", line[4:])
                elif line.startswith("fn="):
                    name("fn", line[3:])
                elif line.startswith("cfn="):
                    callee = name("fn", line[4:])
                elif line.startswith("calls="):
                    in_call = True
                    if CLOCK.match(callee):
                        clock_calls += int(line[6:].split()[0])
                elif line and (line[0].isdigit() or line[0] in "+-*"):
                    fields = line.split()
                    tok = fields[0]
                    if tok.startswith("+"):
                        last += int(tok[1:], 0)
                    elif tok.startswith("-"):
                        last -= int(tok[1:], 0)
                    elif tok != "*":
                        last = int(tok, 0)
                    if in_call:
                        # (the line after `calls=` is the call's inclusive cost)
                        in_call = False
                    elif obj and len(fields) >= 3:
                        executed[(obj, last)] += int(fields[2])
    by_object = collections.defaultdict(list)
    for (obj, address), n in executed.items():
        by_object[obj].append((address, n))
    locked = {}
    for obj, counted in by_object.items():
        addresses = locked_addresses(obj)
        n = sum(n for a, n in counted if a in addresses)
        if n >= requests / 20:
            locked[obj] = n
    print(
        "%.1f locked instructions, %.1f clock readings per request"
        % (sum(locked.values()) / requests, clock_calls / requests)
    )
    for obj, n in sorted(locked.items(), key=lambda x: -x[1]):
        print("  %6.1f locked in %s" % (n / requests, obj.rsplit("/", 1)[-1]))


if __name__ == "__main__":
    main()
