"""Benchmark results as JSON files, and the tables of docs/benchmarks.md generated from them.

Two commands:

    python benchmarks/tables.py record NAME [--note TEXT] -- COMMAND [ARGS...]
    python benchmarks/tables.py [--check]

``record`` runs COMMAND (a benchmark that prints JSON on stdout, e.g. ``python benchmarks/bake_scale.py
--shapes tiny-gemma2 --workdir /tmp/bs``), and writes ``benchmarks/results/NAME.json``:

    benchmark     NAME
    command       the exact command line that ran (shell-quoted)
    machine       cpu_model (from /proc/cpuinfo), cores (logical CPUs), memory_gib (MemTotal), platform
    date          when the command started, UTC, ISO 8601
    load_average  the 1/5/15-minute load averages before and after the run (a busy machine is slower)
    note          --note, free text (what else ran, why this setting)
    wall_s        wall-clock seconds of the whole command
    exit_code     the command's exit status (a failed run is recorded too, and shows in the table)
    figures       the JSON the command printed: the whole stdout if it is one JSON value, else the last
                  JSON line that is a list, else the JSON objects of every line (a list)

The default command reads every ``benchmarks/results/*.json`` and rewrites the part of docs/benchmarks.md
between ``<!-- tables:begin -->`` and ``<!-- tables:end -->`` (the rest of the page is left alone): per
result, its command, machine, date, load and note, then its figures as tables (a list of objects: one row
each; an object: its scalar fields, and a table per list of objects inside it). ``--check`` writes nothing
and exits 1 when the page is not up to date. Nothing but the JSON files goes into the tables.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
PAGE = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"

# Fields left out of the tables, per benchmark script (long, or repeated in the header).
SKIP = {
    "bake_scale.py": {"command", "stderr_tail", "cpus", "ram_gib"},
    "gguf_inplace_8b.py": {"file_making.bytes", "file_making.maker_version"},  # file_bytes; the cache's key
}
# Column order, per benchmark script: these first, the others after them in the JSON's order.
FIRST = {
    "bake_scale.py": ["shape", "params", "layers", "map_sites", "checkpoint_bytes", "shards", "export_dtype",
                      "export_bytes", "bake_wall_s", "bake_peak_rss_gib", "cp_wall_s", "ratio_to_cp", "exit_code"],
}

PAGE_TEMPLATE = f"""# Benchmarks

{BEGIN}
{END}
"""


# -- record ------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) * 1024 / 2**30, 1)
                break
    except OSError:
        pass
    return {"cpu_model": cpu or platform.processor() or None, "cores": os.cpu_count(), "memory_gib": mem,
            "platform": platform.platform()}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def parse_figures(stdout: str):
    """The JSON a benchmark printed (see the module docstring), or None."""
    text = stdout.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    values = []
    for line in text.splitlines():
        line = line.strip()
        if line[:1] in "[{":
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    lists = [v for v in values if isinstance(v, list)]
    if lists:
        return lists[-1]
    objects = [v for v in values if isinstance(v, dict)]
    if len(objects) == 1:
        return objects[0]
    return objects or None


def record(name: str, command: list[str], note: str | None) -> int:
    if not command:
        print("tables.py record: give the command after --", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    before = load_average()
    t0 = time.perf_counter()
    proc = subprocess.run(command, check=False, stdout=subprocess.PIPE, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    after = load_average()
    sys.stdout.write(proc.stdout)
    figures = parse_figures(proc.stdout)
    out = {"benchmark": name, "command": shlex.join(command), "machine": machine(),
           "date": start.isoformat(), "load_average": {"before": before, "after": after},
           "note": note or "", "wall_s": round(wall, 1), "exit_code": proc.returncode, "figures": figures}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nwrote {path.relative_to(REPO)}", file=sys.stderr)
    if figures is None:
        print("tables.py record: the command printed no JSON", file=sys.stderr)
        return 1
    return proc.returncode


# -- tables ------------------------------------------------------------------------------------------
def script_of(command: str) -> str:
    for word in shlex.split(command):
        if word.endswith(".py"):
            return Path(word).name
    return ""


def cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        text = (f"{value:.4g}" if abs(value) < 1 or abs(value) >= 1e9
                else f"{value:.2f}".rstrip("0").rstrip("."))  # 4 significant digits below 1, 2 decimals above
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    text = " ".join(text.split())
    for char, escaped in (("\\", "\\\\"), ("|", "\\|"), ("*", "\\*"), ("`", "\\`"), ("<", "&lt;")):
        text = text.replace(char, escaped)
    return text


def loads(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values) if values else "—"


def flatten(obj: dict, prefix: str = "") -> dict:
    """Scalars (and lists of scalars) of ``obj``, nested objects as dotted keys; lists of objects left out."""
    out = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            continue
        else:
            out[key] = v
    return out


def row_table(rows: list[dict], skip: set[str], first: list[str]) -> list[str]:
    flat = [flatten(r) for r in rows]
    keys: list[str] = [k for k in first if any(k in r for r in flat)]
    for r in flat:
        keys += [k for k in r if k not in keys and k not in skip]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in flat]
    return lines


def figure_tables(figures, skip: set[str], first: list[str]) -> list[str]:
    if isinstance(figures, list) and figures and all(isinstance(x, dict) for x in figures):
        return row_table(figures, skip, first)
    if isinstance(figures, dict):
        flat = {k: v for k, v in flatten(figures).items() if k not in skip}
        lines = ["| field | value |", "|---|---|"] + [f"| {k} | {cell(v)} |" for k, v in flat.items()]
        for k, v in figures.items():
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                lines += ["", f"`{k}`:", ""] + row_table(v, skip, first)
        return lines
    return ["```", json.dumps(figures, indent=1, ensure_ascii=False), "```"]


def section(result: dict) -> list[str]:
    m = result.get("machine") or {}
    load = result.get("load_average") or {}
    script = script_of(result.get("command", ""))
    lines = [f"### {result['benchmark']}", "", "```", result.get("command", ""), "```", ""]
    facts = [(f"**machine**: {m.get('cpu_model') or 'unknown CPU'}, {m.get('cores')} cores, "
              f"{m.get('memory_gib')} GiB"),
             f"**date**: {result.get('date', '')}",
             f"**load average** (1, 5, 15 min) before: {loads(load.get('before'))}; after: {loads(load.get('after'))}",
             f"**wall**: {cell(result.get('wall_s'))} s, **exit code**: {result.get('exit_code')}"]
    if result.get("note"):
        facts.append(f"**note**: {result['note']}")
    lines += [f"- {f}" for f in facts] + [""]
    lines += figure_tables(result.get("figures"), SKIP.get(script, set()), FIRST.get(script, []))
    return lines + [""]


def render(results_dir: Path = RESULTS) -> str:
    files = sorted(results_dir.glob("*.json"))
    out = [BEGIN, "",
           "<!-- generated by python benchmarks/tables.py from benchmarks/results/*.json; do not edit -->", ""]
    if not files:
        out += ["No results recorded yet.", ""]
    for f in files:
        out += section(json.loads(f.read_text(encoding="utf-8")))
    return "\n".join(out) + "\n" + END


def update_page(page: Path, results_dir: Path, check: bool) -> int:
    text = page.read_text(encoding="utf-8") if page.exists() else PAGE_TEMPLATE
    if BEGIN not in text or END not in text:
        print(f"{page}: no {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    new = head + render(results_dir) + tail
    if check:
        if new != text:
            print(f"{page} is out of date: run python benchmarks/tables.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        page.write_text(new, encoding="utf-8")
        print(f"wrote {page}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["record"]:
        command = []
        if "--" in argv:
            i = argv.index("--")
            argv, command = argv[:i], argv[i + 1:]
        ap = argparse.ArgumentParser(prog="tables.py record", description="run a benchmark, keep its JSON")
        ap.add_argument("name", help="result name: benchmarks/results/NAME.json")
        ap.add_argument("--note", help="free text stored with the result (load, what else ran, ...)")
        args = ap.parse_args(argv[1:])
        return record(args.name, command, args.note)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSON files")
    ap.add_argument("--page", type=Path, default=PAGE, help="the page to update (default: docs/benchmarks.md)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if the page is out of date")
    args = ap.parse_args(argv)
    return update_page(args.page, args.results, args.check)


if __name__ == "__main__":
    sys.exit(main())
