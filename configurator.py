"""
nanoGPT-style configuration, stricter: every script keeps its config as flat globals and calls

    cfg = configure(globals(), config_keys, sys.argv[1:])

with arguments like `config/tiny_cpu.py --lr=1e-4 --out_dir=out/x`. Config files are executed and
their keys checked like command-line ones; unknown keys, wrong types and bad syntax stop the run with
a sentence naming the key. Ints are accepted for floats, lists for tuples, anything for a None default.
Returns the resolved config as a dict (printed by the scripts and saved with their outputs).

One experiment file (config/geneval_g4k12.py) serves every stage: a key that belongs to another
stage's script (phase1 reads mu/eps, phase2 reads lr/beta) is skipped by this one; a key that no
stage knows is a typo and stops the run. Command-line keys must belong to the script being run.
"""
import ast
import os
from ast import literal_eval

STAGES = ("sample.py", "phase1_perturb.py", "phase2_align.py", "eval_diversity.py", "compare_runs.py",
          "export.py")


def stage_keys():
    """Config keys of every stage script: the top-level names assigned before its `config_keys` line."""
    keys = set()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in STAGES:
        path = os.path.join(here, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)):
                if node.targets[0].id == "config_keys":
                    break
                keys.add(node.targets[0].id)
    return keys


def _coerce(key, value, default, source):
    if default is None or value is None:
        return value
    if isinstance(default, bool):  # before int: bool is an int subclass
        if isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(default, tuple) and isinstance(value, (tuple, list)):
        return tuple(value)
    elif isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool)):
        return value
    raise SystemExit(f"{source}: config key '{key}' expects {type(default).__name__}, "
                     f"got {type(value).__name__} {value!r}")


def configure(g, keys, argv):
    keys = set(keys)
    # remember the script's own defaults on the first call and start every call from them, so that
    # main() can run twice in one process (tests) without inheriting the last run's settings
    defaults = g.setdefault("_config_defaults", {k: g[k] for k in keys})
    g.update(defaults)
    all_keys = None  # computed on the first config file
    for arg in argv:
        if not arg.startswith("--"):
            try:
                with open(arg, encoding="utf-8") as f:
                    src = f.read()
            except OSError:
                raise SystemExit(f"config file '{arg}' not found (arguments are config files or --key=value)")
            ns = {}
            try:
                exec(compile(src, arg, "exec"), ns)
            except Exception as err:
                raise SystemExit(f"config file '{arg}' failed to run: {type(err).__name__}: {err}")
            for k, v in ns.items():
                if k.startswith("_") or type(v).__name__ == "module":
                    continue
                if k not in keys:
                    all_keys = all_keys or stage_keys()
                    if k in all_keys:
                        continue  # another stage's setting
                    raise SystemExit(f"config file '{arg}' sets '{k}', which no stage knows; "
                                     f"known keys here: {', '.join(sorted(keys))}")
                g[k] = _coerce(k, v, defaults[k], arg)
        else:
            if "=" not in arg:
                raise SystemExit(f"argument '{arg}' must look like --key=value")
            k, s = arg[2:].split("=", 1)
            if k not in keys:
                raise SystemExit(f"unknown config key '{k}'; known keys: {', '.join(sorted(keys))}")
            try:
                v = literal_eval(s)
            except (ValueError, SyntaxError):
                v = s  # a bare string: --model=tiny
            if isinstance(defaults[k], str) and not isinstance(v, str):
                v = s  # --out_dir=123 stays a string
            g[k] = _coerce(k, v, defaults[k], f"--{k}")
    cfg = {k: g[k] for k in sorted(keys)}
    return cfg


def config_summary(cfg, width=110):
    """The resolved config as `key=value` pairs wrapped at `width` characters: what a run prints (its
    config.json holds the same in full)."""
    import textwrap
    return textwrap.fill(" ".join(f"{k}={v!r}".replace(" ", "") for k, v in cfg.items()), width,
                         break_long_words=False, break_on_hyphens=False)
