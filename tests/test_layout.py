#!/usr/bin/env python3
"""The layout of ARCHITECTURE.md, checked: one library per folder, dependencies one way.

Each library may include the public headers (actsim/<lib>/...) only of the libraries below it, and
its CMake target may link only those. A new arrow upward (sim including study, schedule including
an analysis, backends including the engine, ...) fails here.

    test_layout.py SOURCE_DIR
"""
import os
import re
import sys

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
# What each library may use (ARCHITECTURE.md's picture).
ALLOWED = {
    "util": set(),
    "graph": {"util"},
    "sim": {"util", "graph"},
    "schedule": {"util", "graph"},
    "backends": {"util", "graph"},
    "study": {"util", "graph", "sim", "schedule"},
    "replay": {"util", "graph", "schedule", "backends"},
    "report": {"util", "graph", "sim", "schedule", "study"},
    "tools": {"util", "graph", "sim", "schedule", "backends", "study", "replay", "report"},
}
problems = []
checked = 0
for lib, allowed in ALLOWED.items():
    for dirpath, _, names in os.walk(os.path.join(ROOT, lib)):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, ROOT)
            if name.endswith((".cpp", ".hpp", ".cu", ".cuh")):
                checked += 1
                with open(path, encoding="utf-8") as f:
                    for n, line in enumerate(f, 1):
                        m = re.match(r'\s*#\s*include\s+"actsim/(\w+)/', line)
                        if m and m.group(1) != lib and m.group(1) not in allowed:
                            problems.append(f"{rel}:{n}: {lib}/ includes {m.group(1)}/ (allowed: {sorted(allowed) or 'nothing'})")
                        m = re.match(r'\s*#\s*include\s+"\.\./\.\./?(\w+)/', line)
                        if m and m.group(1) != lib and m.group(1) not in allowed:
                            problems.append(f"{rel}:{n}: {lib}/ reaches into {m.group(1)}/ by a relative path")
            elif name == "CMakeLists.txt":
                text = open(path, encoding="utf-8").read()
                for m in re.finditer(r"target_link_libraries\(\s*(\S+)([^)]*)\)", text):
                    for dep in re.findall(r"\bactsim_(\w+)", m.group(2)):
                        if dep != lib and dep not in allowed and dep not in ("cuda_module",):
                            problems.append(f"{rel}: {m.group(1)} links actsim_{dep} (allowed: {sorted(allowed)})")
for p in problems:
    print("FAIL  " + p)
print(f"{checked} source files checked, {len(problems)} upward dependencies")
sys.exit(1 if problems or checked < 50 else 0)
