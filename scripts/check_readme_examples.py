#!/usr/bin/env python3
"""Checks that every code block a README marks as an example file is that file.

A README says `<!-- example: PATH -->` on the line before a fenced code block; PATH is
relative to the README. The block must be the file's content exactly (the test command
builds and runs those files, so the README shows code that is known to work).

Usage: scripts/check_readme_examples.py README.md [MORE.md ...]
"""
import pathlib
import re
import sys

MARK = re.compile(r"^<!-- example: (\S+) -->$")


def check(readme: pathlib.Path) -> list[str]:
    problems = []
    lines = readme.read_text().split("\n")
    found = 0
    for i, line in enumerate(lines):
        m = MARK.match(line.strip())
        if not m:
            continue
        found += 1
        path = (readme.parent / m.group(1)).resolve()
        if i + 1 >= len(lines) or not lines[i + 1].startswith("```"):
            problems.append(f"{readme}:{i + 1}: the example mark is not followed by a code block")
            continue
        end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            problems.append(f"{readme}:{i + 2}: the code block does not end")
            continue
        block = "\n".join(lines[i + 2:end]) + "\n"
        if not path.exists():
            problems.append(f"{readme}:{i + 1}: {m.group(1)} does not exist")
        elif path.read_text() != block:
            problems.append(f"{readme}:{i + 1}: the code block differs from {m.group(1)} (copy the file into the README)")
    if found == 0:
        problems.append(f"{readme}: no example marks")
    return problems


def main() -> int:
    problems = [p for arg in sys.argv[1:] for p in check(pathlib.Path(arg))]
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print(f"README examples are the files they name ({', '.join(sys.argv[1:])})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
