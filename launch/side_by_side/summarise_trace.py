"""Device time of a jax.profiler trace, by kernel and by kind of work.

    python launch/side_by_side/summarise_trace.py TRACE_DIR [--steps N] [--hlo FILE] [--out kernels.json]

Reads the Chrome/Perfetto JSON trace that jax.profiler.trace writes
(TRACE_DIR/plugins/profile/*/*.trace.json.gz or perfetto_trace.json.gz; no
TensorBoard needed). Device events: on a GPU/TPU the kernels on the
'/device:...' process's stream lines ('Stream ...', else 'XLA Ops'); on the
CPU, the XLA thunks (events carrying an 'hlo_op'). --hlo (the compiled step's
HLO text, `compiled.as_text()`) adds each op's jax name stack, which is what
tells the model's work from the optimizer's: ops outside any transform or
module scope are the optimizer, EMA and metrics ('optimizer_ema'), their
all-finite checks 'finite_check'.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re

# Kind of work, first match wins: (kind, field searched, pattern).
# Fields: "kernel" = kernel and HLO-op names, "all" = those plus the jax name stack.
KINDS = (
    ("collectives", "kernel", r"all-reduce|all-gather|reduce-scatter|all-to-all|collective|nccl"),
    ("copies", "kernel", r"memcpy|memset|copy|transpose|concatenate|dynamic[-_]update[-_]slice|gather|scatter|pad\b"),
    ("attention", "all", r"flash|fmha|fused_attention|cudnn.*(fprop|bprop)|dot_product_attention|softmax"),
    ("matmul", "kernel", r"gemm|xmma|cutlass|cublas|\bdot|dot[._]|conv|matmul|triton|ynn"),  # ynn: XLA:CPU's XNNPACK dots
    ("finite_check", "stack", r"^jit\([^)]*\)/(is_finite|reduce_and)$"),
    ("optimizer_ema", "stack", r"^jit\([^)]*\)/(jit\([^)]*\)/)?[^/()]+$"),
    ("norms_elementwise", "all", r"fusion|norm|reduce|add|mul|sub|div|exp|erf|tanh|select|convert|broadcast"),
)
OP_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*metadata=\{op_name=\"([^\"]*)\"")


def find_trace(trace_dir: str) -> str:
    """The newest JSON trace under trace_dir (a file path is returned as it is)."""
    if os.path.isfile(trace_dir):
        return trace_dir
    found = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.json.gz"))
    if not found:
        raise FileNotFoundError(f"no plugins/profile/*/*.json.gz under {trace_dir}")
    return max(found, key=os.path.getmtime)


def name_stacks(hlo_text: str) -> dict:
    """HLO instruction name -> jax name stack (its metadata op_name), from compiled.as_text()."""
    return {m.group(1): m.group(2) for m in map(OP_NAME.match, hlo_text.splitlines()) if m}


def device_events(events: list) -> list:
    """The complete ('X') events that are device work, per the module docstring."""
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    xs = [e for e in events if e.get("ph") == "X" and "dur" in e]
    devices = {pid for pid, name in procs.items() if name.startswith("/device:")}
    if devices:
        lines = {k: v for k, v in threads.items() if k[0] in devices}
        for prefix in ("Stream", "XLA Ops"):
            chosen = {k for k, v in lines.items() if v.startswith(prefix)}
            if chosen:
                return [e for e in xs if (e["pid"], e.get("tid")) in chosen]
    return [e for e in xs if "hlo_op" in e.get("args", {}) and not e["name"].startswith("end: ")]


def kind(kernel: str, stack: str) -> str:
    fields = {"kernel": kernel, "stack": stack, "all": f"{kernel} {stack}"}
    for name, field, pattern in KINDS:
        if re.search(pattern, fields[field], re.IGNORECASE):
            return name
    return "other"


def summarise(path: str, steps: int = 1, top: int = 15, stacks: dict | None = None) -> dict:
    """Per-step device milliseconds by kind and the `top` kernels by time, shares of the total."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = device_events(data["traceEvents"] if isinstance(data, dict) else data)
    stacks = stacks or {}
    per_kernel = collections.defaultdict(lambda: [0.0, 0, ""])
    for e in events:
        hlo_op = e.get("args", {}).get("hlo_op", "")
        kernel = f"{e['name']} {hlo_op}".strip() if hlo_op and hlo_op != e["name"] else e["name"]
        entry = per_kernel[kernel]
        entry[0] += e["dur"] / 1e3 / steps  # trace durations are in microseconds
        entry[1] += 1
        entry[2] = entry[2] or kind(kernel, stacks.get(hlo_op, ""))
    total = sum(v[0] for v in per_kernel.values()) or 1.0
    by_kind = collections.Counter()
    for ms, _, k in per_kernel.values():
        by_kind[k] += ms
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "trace": path,
        "steps": steps,
        "device_events": len(events),
        "device_ms_per_step": round(total, 3),
        "by_kind": {k: {"ms_per_step": round(ms, 3), "share": round(ms / total, 4)} for k, ms in by_kind.most_common()},
        "top_kernels": [{"kernel": name[:160], "kind": k, "ms_per_step": round(ms, 3), "share": round(ms / total, 4),
                         "calls_per_step": round(n / steps, 2)} for name, (ms, n, k) in ranked],
    }


def markdown(summary: dict) -> str:
    lines = [f"Device time per step: {summary['device_ms_per_step']} ms ({summary['steps']} steps traced)", "",
             "| kind | ms/step | share |", "|---|---|---|"]
    lines += [f"| {k} | {v['ms_per_step']} | {100 * v['share']:.1f} % |" for k, v in summary["by_kind"].items()]
    lines += ["", "| kernel | kind | ms/step | share | calls/step |", "|---|---|---|---|---|"]
    lines += [f"| `{t['kernel']}` | {t['kind']} | {t['ms_per_step']} | {100 * t['share']:.1f} % | {t['calls_per_step']} |"
              for t in summary["top_kernels"]]
    return "\n".join(lines) + "\n"


def write(summary: dict, out: str) -> None:
    """out (JSON) and, beside it, the same as a Markdown table (out with .md)."""
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(markdown(summary))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace_dir")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds (times are per step)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--hlo", default="", help="the compiled step's HLO text, for the name stacks")
    p.add_argument("--out", default="", help="write JSON here and Markdown beside it")
    a = p.parse_args()
    stacks = name_stacks(open(a.hlo).read()) if a.hlo else None
    summary = summarise(find_trace(a.trace_dir), a.steps, a.top, stacks)
    if a.out:
        write(summary, a.out)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
