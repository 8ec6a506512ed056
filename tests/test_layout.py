"""The layout's promises, checked on the source:

- the core (model.py, router.py, dlo.py) is DLO alone: within 900 lines together, each
  forward within 30 lines and every function within 40; model.py and router.py import
  only torch and the standard library, dlo.py only them and kernels.py;
- imports run one way, scripts -> weights -> variants -> core, with no circle;
- DLO's reading path, as the README lists it (file:line), is where the README says,
  within 500 lines, and names no other method.

    python tests/test_layout.py     # prints the counts
"""
import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ("model.py", "router.py", "dlo.py")
CORE_BUDGET, FORWARD_BUDGET, FUNCTION_BUDGET, READING_BUDGET = 900, 30, 40, 500
# lower rank = lower in the house; an import may go to the same rank or lower, never higher
RANK = {**dict.fromkeys(("model", "kernels", "router", "dlo", "schedule"), 0),
        **dict.fromkeys(("cache", "skipping", "retention", "mod", "controls", "growth", "gpt2", "lesa", "methods",
                         "tokenizer", "data", "tuning", "decode"), 1),
        "weights": 2,
        **dict.fromkeys(("train", "sample", "evaluate", "bench", "compare", "frontier", "lesa_claim", "export"), 3)}
# DLO's path, in reading order: (file, function or Class.method), as the README lists it
READING_PATH = [
    ("dlo.py", "expand"), ("dlo.py", "interleave_plan"), ("dlo.py", "index_plan"), ("dlo.py", "zeros_init"),
    ("dlo.py", "rebuild"), ("dlo.py", "new_config"),
    ("dlo.py", "activate"), ("router.py", "Router"), ("router.py", "dlo_gate"),
    ("router.py", "select"), ("router.py", "Rule.choose"), ("router.py", "select_topk"),
    ("router.py", "select_threshold"), ("router.py", "routable_tokens"),
    ("dlo.py", "RoutedBlock.forward"), ("dlo.py", "add_selected"),
    ("router.py", "similarity_labels"), ("router.py", "lowest_first"), ("router.py", "router_loss"),
    ("schedule.py", "CapacitySchedule"),
    ("dlo.py", "calibrate"), ("dlo.py", "thresholds_from_topk"),
    ("sample.py", "generate_stream"), ("sample.py", "decode_one_token"), ("dlo.py", "RoutedBlock.forward_one"),
    ("dlo.py", "RoutedBlock.decide_one"),
]
OTHER_METHODS = re.compile(r"\b(attn_router|attn_routed_layers|kv_policy|kv_window|route_gate|route_predictor|"
                           r"predictor|gpt2|arch|retention|window|PARTS|SkipBlock|mod)\b")


def tree(name):
    with open(os.path.join(ROOT, name)) as f:
        return ast.parse(f.read())


def functions(node, prefix=""):
    """(qualified name, node) of every function and class, nested ones included."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
            yield prefix + child.name, child
            yield from functions(child, prefix + child.name + ".")


def lines(node):
    return node.end_lineno - node.lineno + 1


def project_imports(name):
    found = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return {m for m in found if os.path.exists(os.path.join(ROOT, m + ".py"))}


def project_files():
    return sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def find(name, qualname):
    return dict(functions(tree(name)))[qualname]


def test_the_core_keeps_its_budgets():
    total = sum(len(open(os.path.join(ROOT, f)).read().splitlines()) for f in CORE)
    assert total <= CORE_BUDGET, f"model.py + router.py + dlo.py: {total} lines"
    for f in CORE:
        for qualname, node in functions(tree(f)):
            if isinstance(node, ast.FunctionDef):
                budget = FORWARD_BUDGET if node.name == "forward" else FUNCTION_BUDGET
                assert lines(node) <= budget, f"{f}: {qualname} is {lines(node)} lines"


def test_the_core_imports_only_torch_and_kernels():
    allowed = {"model.py": set(), "router.py": set(), "dlo.py": {"kernels", "model", "router"}, "kernels.py": set()}
    for f, ok in allowed.items():
        assert project_imports(f) <= ok, f"{f} imports {sorted(project_imports(f) - ok)}"
        third_party = {a.name.split(".")[0] for node in ast.walk(tree(f)) if isinstance(node, ast.Import)
                       for a in node.names} | {node.module.split(".")[0] for node in ast.walk(tree(f))
                                               if isinstance(node, ast.ImportFrom)}
        assert third_party - ok <= {"torch", "triton", "math", "os", "sys", "copy", "dataclasses", "typing"}, f


def test_imports_run_one_way_without_a_circle():
    graph = {m: project_imports(m + ".py") for m in project_files()}
    assert set(graph) <= set(RANK), f"give {sorted(set(graph) - set(RANK))} a rank in tests/test_layout.py"
    for m, deps in graph.items():
        for d in deps:
            assert RANK[d] <= RANK[m], f"{m}.py (rank {RANK[m]}) imports {d}.py (rank {RANK[d]}): an arrow up"
    done, active = set(), []

    def visit(m):   # depth-first; meeting a module still on the stack closes a circle
        assert m not in active, "import circle: " + " -> ".join(active[active.index(m):] + [m])
        if m not in done:
            active.append(m)
            for d in sorted(graph[m]):
                visit(d)
            active.pop()
            done.add(m)
    for m in graph:
        visit(m)


def reading_path():
    """[(file, qualname, line, length)] of the reading path."""
    return [(f, q, find(f, q).lineno, lines(find(f, q))) for f, q in READING_PATH]


def test_the_reading_path_is_short_pure_and_where_the_readme_says():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    total = 0
    for f, qualname, line, length in reading_path():
        total += length
        short = qualname.split(".")[-1] if "." in qualname else qualname
        assert f"`{short}` ({f}:{line})" in readme or f"`{qualname}` ({f}:{line})" in readme, \
            f"README should list {qualname} as ({f}:{line})"
        node = find(f, qualname)
        source = ast.get_source_segment(open(os.path.join(ROOT, f)).read(), node)
        code = "\n".join(l.split("#")[0] for l in source.splitlines())
        assert not OTHER_METHODS.search(code), f"{f}:{qualname} names another method: {OTHER_METHODS.search(code)[0]}"
    assert total <= READING_BUDGET, f"the reading path is {total} lines"


if __name__ == "__main__":
    counts = {f: len(open(os.path.join(ROOT, f)).read().splitlines()) for f in CORE}
    print(" + ".join(f"{f} {n}" for f, n in counts.items()), f"= {sum(counts.values())} lines (budget {CORE_BUDGET})")
    path = reading_path()
    for f, qualname, line, length in path:
        print(f"  {f}:{line:<5} {qualname:32} {length:4} lines")
    print(f"reading path: {sum(n for *_, n in path)} lines (budget {READING_BUDGET})")
    sys.exit(0)
