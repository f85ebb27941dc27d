"""The `ivx` command: run, check, format and explain `.ivx` experiments.

Exit codes: 0 success, 1 the experiment is invalid (or failed while running), 2 usage or syntax.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from compiler.errors import Diagnostic, InterventionError
from compiler.ir import Span
from grammar import ast
from grammar.parser import IvxSyntaxError, parse, parse_file, read_source
from grammar.printer import format_module
from runtime.modes import MODES

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ivx", description="Run, check, format and explain .ivx experiments.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run an experiment over its prompts and sweeps; write shards",
                         description="Run an experiment over every prompt row and sweep point; write "
                                     "safetensors shards and manifest.json to --out. Rerunning with the "
                                     "same --out resumes after the last complete shard.")
    run.add_argument("file", help="the .ivx experiment")
    run.add_argument("--out", help="output directory (default: runs/<file stem>)")
    run.add_argument("--prompts", action="append", default=[], metavar="[NAME=]FILE",
                     help="stream prompts from a .txt, .jsonl or .csv file into the experiment's prompt "
                          "(NAME= when it declares several; repeatable)")
    run.add_argument("--field", default="text", help="the jsonl field or csv column holding the text (default: text)")
    run.add_argument("--batch-size", type=int, default=32, help="prompts per batch (default 32)")
    run.add_argument("--shard-size", type=int, default=1024, help="prompts per results shard (default 1024)")
    run.add_argument("--model", help="model name or path, overriding the file's `model` line")
    run.add_argument("--quiet", action="store_true", help="print nothing but errors")
    run.add_argument("--remote", metavar="URL",
                     help="run every batch as a job on an `ivx serve` at URL (key: $IVX_API_KEY); "
                          "results are written here, resumable as a local run's")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="where shards are computed: here (default), or by workers on a Ray cluster, each "
                          "holding the model; results are written here either way")
    run.add_argument("--ray-address", metavar="auto|HOST:PORT",
                     help="with --executor ray: the cluster to join (default: start a local Ray instance)")
    run.add_argument("--workers", type=int, metavar="N",
                     help="with --executor ray: model copies computing shards (default: one per GPU, "
                          "or one per node)")
    run.add_argument("--restart", action="store_true",
                     help="discard the results already in --out (manifest.json and its shards) and start over")
    run.add_argument("--compile", choices=MODES,
                     help="execution: off (reference interpreter), graph (spliced fx graph), inductor, "
                          "cudagraphs (GPU), auto (compiled where it pays; the default, or $IVX_COMPILE)")
    for command in (run,):
        _add_bindings(command)
    show = sub.add_parser("show", help="summarise a results directory",
                          description="Summarise the results in a directory written by ivx run.")
    show.add_argument("dir")
    plot = sub.add_parser("plot", help="plot one save of a results directory as a PNG (needs matplotlib)",
                          description="Plot a save averaged over prompts: a line over one swept axis, "
                                      "or a heatmap over two (e.g. layer x position).")
    plot.add_argument("dir")
    plot.add_argument("name", help="the save to plot (one number per row)")
    plot.add_argument("--out", help="the PNG to write (default: DIR/NAME.png)")
    fmt = sub.add_parser("fmt", help="print the canonical form", description="Print the canonical form.")
    fmt.add_argument("file")
    fmt.add_argument("--write", action="store_true", help="rewrite the file in place")
    fmt.add_argument("--check", action="store_true", help="exit 1 if the file is not canonical")
    check = sub.add_parser("check", help="check specs against the model's shapes, without weights",
                           description="Check experiments against the model's shapes on fake "
                                       "tensors, without loading any weights. Exit 1 on errors.")
    check.add_argument("files", nargs="+", help=".ivx files")
    check.add_argument("--model", help="model name, HF directory, config.json or .gguf, overriding each file's")
    check.add_argument("--format", choices=("text", "json", "github"), default="text",
                       help="text (default), json for tools, github for Actions annotations")
    explain = sub.add_parser("explain", help="print the typed IR", description="Print the typed IR.")
    explain.add_argument("file")
    explain.add_argument("--model", help="model name or path, overriding the file's `model` line")
    explain.add_argument("--ivx", action="store_true", help="print the IR as .ivx text instead")
    explain.add_argument("--graph", action="store_true",
                         help="run once compiled and print the patched graph around each site")
    _add_bindings(explain)
    serve = sub.add_parser("serve", help="serve a model over HTTP: run IR jobs sent by remote clients",
                           description="Serve one model over HTTP (FastAPI + uvicorn): clients send "
                                       "experiments as IR, never code. Ctrl-C or SIGTERM stops it.")
    from interp_dsl.server import add_arguments
    add_arguments(serve)
    return p


def _add_bindings(command: argparse.ArgumentParser) -> None:
    command.add_argument("--prompt", action="append", default=[], metavar="NAME=TEXT",
                         help="text for a `prompt NAME` declared without one (repeatable)")
    command.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                         help="a value for `param NAME: TYPE`: a number, or FILE.safetensors[:KEY]")


def _bindings(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, Any]]:
    prompts, params = {}, {}
    for item in args.prompt:
        name, sep, text = item.partition("=")
        if not sep:
            raise _usage(f"--prompt expects NAME=TEXT, got {item!r}")
        prompts[name] = text
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep:
            raise _usage(f"--param expects NAME=VALUE, got {item!r}")
        params[name] = _param_value(name, value)
    return prompts, params


def _param_value(name: str, text: str) -> Any:
    """A number, or a tensor of a safetensors file (`FILE[:KEY]`)."""
    try:
        return float(text)
    except ValueError:
        pass
    from interp_dsl.ivx import read_tensor
    file, _, key = text.partition(":")
    if not Path(file).is_file():
        raise _usage(f"--param {name}={text}: expected a number or FILE.safetensors[:KEY], "
                     f"and there is no file {file!r}")
    return read_tensor(Path(file), key or None, Span(f"--param {name}", 0))


class _UsageError(Exception):
    pass


def _usage(message: str) -> _UsageError:
    return _UsageError(message)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # the command prints its own summary; keep stderr for errors
    try:
        commands = {"run": _run, "fmt": _fmt, "explain": _explain, "check": _check, "show": _show, "plot": _plot,
                    "serve": _serve}
        return commands[args.command](args)
    except IvxSyntaxError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    except InterventionError as e:
        print(e, file=sys.stderr)
        return EXIT_INVALID
    except _UsageError as e:
        print(f"ivx: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"ivx: {e.strerror}: {e.filename}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ivx: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: say so briefly, keep the traceback behind a flag
        if os.environ.get("IVX_DEBUG"):
            traceback.print_exc()
        print(f"ivx: internal error: {type(e).__name__}: {e} (set IVX_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 3


def _check(args: argparse.Namespace) -> int:
    from interp_dsl.ivx.check import check_files, render

    paths = [Path(f) for f in args.files]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise _usage(f"no such file: {missing[0]}")
    unreadable = _unreadable(paths)
    report = check_files([p for p in paths if p not in unreadable], args.model)
    if unreadable:
        report.files += len(unreadable)
        report.syntax_error = True
        report.diagnostics = sorted(report.diagnostics + list(unreadable.values()),
                                    key=lambda d: (d.span.file, d.span.line, d.span.col))
    print(render(report, args.format))
    return report.exit_code()


def _unreadable(paths: list[Path]) -> dict[Path, Diagnostic]:
    """The files that are not UTF-8 text, each with its error (reported with the others)."""
    out = {}
    for path in paths:
        try:
            read_source(path)
        except IvxSyntaxError as e:
            out[path] = e.diagnostics[0]
    return out


def _fmt(args: argparse.Namespace) -> int:
    path = Path(args.file)
    source = read_source(path)
    text = format_module(parse(source, str(path)))
    if args.check:
        return EXIT_OK if text == source else EXIT_INVALID
    if args.write:
        path.write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    from compiler.printer import format_program
    from interp_dsl.ivx import load_experiment, lower_traces, resolve_model, session_blocks

    exp = load_experiment(args.file, *_bindings(args))
    if exp.generate is not None and (args.ivx or args.graph):
        raise _usage("--ivx and --graph explain one forward; a generation's IR is unrolled per step "
                     "(each decode step compiles to a graph of its own): run `ivx explain FILE` without them")
    if args.ivx and session_blocks(exp) is not None:
        raise _usage("--ivx prints one program as .ivx, and a session is several: run `ivx explain FILE` "
                     "to see each trace's IR")
    model = resolve_model(exp, args.model)
    point = exp.points()[0]
    tracers = lower_traces(exp, model, point, execute=args.graph, compile="graph")
    if exp.sweeps:
        axes = ", ".join(f"{k} ({len(v)} values)" for k, v in exp.sweeps.items())
        print(f"# sweep over {axes}; shown at {point}")
    for number, tracer in enumerate(tracers, 1):
        if len(tracers) > 1:
            print(f"# trace {number} of {len(tracers)}")
        if args.graph:
            if tracer.result.graph is None:
                raise _usage("compiled execution is not possible for this experiment (see the warning above)")
            print(tracer.explain_graph())
        elif args.ivx:
            from grammar.decompile import to_ivx
            print(format_module(to_ivx(tracer.typed.program)), end="")
        else:
            print(format_program(tracer.typed.program, tracer.typed.types, spans=True))
        print(f"# structural hash {tracer.typed.program.structural_hash()}")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from interp_dsl.ivx import load_experiment, resolve_model, run_session, session_blocks, sweep

    texts, params = _bindings(args)
    declared = [d.name for d in parse_file(args.file).body if isinstance(d, ast.PromptDecl)]
    exp = load_experiment(args.file, {**texts, **_prompt_files(args, declared)}, params)
    if args.batch_size < 1 or args.shard_size < 1:
        raise _usage("--batch-size and --shard-size are positive")
    server = None
    if args.remote and args.compile not in (None, "auto", "off"):
        raise _usage("--compile chooses how a local run executes; a remote job runs as its server runs it")
    if args.remote is not None:
        if not args.remote.startswith(("http://", "https://")):
            raise _usage(f"--remote takes the server's URL, http://HOST:PORT; found {args.remote!r}")
        from interp_dsl.client import remote
        server = dataclasses.replace(remote(args.remote, quiet=args.quiet), origin=Span(f"--remote {args.remote}", 0))
    cluster = _cluster(args)
    session = session_blocks(exp) is not None
    if session and (args.prompts or server or cluster):
        raise _usage("a session (trace blocks) runs each of its traces once, here; --prompts, --remote and "
                     "--executor stream prompt rows through a file with one trace")
    model = resolve_model(exp, args.model, weights="fake") if server or cluster else resolve_model(exp, args.model)
    out = Path(args.out or Path("runs") / exp.path.stem)
    if out.exists() and not out.is_dir():
        raise _usage(f"--out {out} is a file; results go in a directory")
    started = time.time_ns()
    if session:
        run: Any = run_session(exp, model, out, compile=args.compile, restart=args.restart)
    else:
        try:
            run = sweep(exp, model, batch_size=args.batch_size, out=out, compile=args.compile,
                        shard_size=args.shard_size, progress=False if args.quiet else None, restart=args.restart,
                        remote=server or False, executor=cluster or "local")
        except InterventionError as e:
            if not _kept_shards(e, out, started):
                raise
            return EXIT_INVALID
    if not args.quiet:
        from interp_dsl.ivx.show import summarise
        print(summarise(run.results, getattr(model, "tokenizer", None)))
        done = "already complete; nothing ran" if not run.ran else f"ran {run.ran} prompts"
        print(f"{done}; results in {out}/ (interp_dsl.load_results, ivx show)")
    return EXIT_OK


def _cluster(args: argparse.Namespace) -> Any:
    """The Ray cluster of `--executor ray` (the driver then reads only the model's config)."""
    if args.executor != "ray":
        if args.ray_address is not None or args.workers is not None:
            raise _usage("--ray-address and --workers go with --executor ray")
        return None
    if args.remote is not None:
        raise _usage("--remote and --executor ray: a run goes to a server or to a Ray cluster, not both")
    if args.workers is not None and args.workers < 1:
        raise _usage(f"--workers is at least 1, got {args.workers}")
    from interp_dsl.cluster import RayCluster
    where = "--ray-address " + args.ray_address if args.ray_address else "--executor ray"
    return RayCluster(args.ray_address, args.workers, Span(where, 0))


def _kept_shards(e: InterventionError, out: Path, started: int) -> bool:
    """A sweep that failed part way (a bad record in a prompt file): its complete shards stay,
    and its manifest records where and why it stopped. False when it had written nothing."""
    from runtime.shards import record_stop
    done = record_stop(out, [f"{d.span}: {d.message}" for d in e.diagnostics], started)
    if done is None:
        return False
    print(e, file=sys.stderr)
    print(f"ivx: the sweep stopped after {done} prompts; their shards stay in {out}/ (its manifest says "
          "where it stopped): fix the input and rerun with the same --out to resume", file=sys.stderr)
    return True


def _prompt_files(args: argparse.Namespace, declared: list[str]) -> dict[str, Any]:
    from runtime.datasets import PromptFile
    out = {}
    for item in args.prompts:
        name, sep, file = item.partition("=")
        if not sep:
            name, file = "", item
        if not name:
            if len(declared) != 1:
                raise _usage(f"--prompts {item}: the experiment declares {len(declared)} prompts "
                             f"({', '.join(declared) or 'none'}); say which with NAME=FILE")
            name = declared[0]
        if name not in declared:
            raise _usage(f"--prompts {item}: the experiment declares no prompt {name!r}")
        out[name] = PromptFile.of(file, args.field)
    return out


def _show(args: argparse.Namespace) -> int:
    from interp_dsl.ivx.show import describe_dir
    out = Path(args.dir)
    text, whole = describe_dir(out)
    print(text)
    return EXIT_OK if whole else EXIT_INVALID


def _serve(args: argparse.Namespace) -> int:
    from interp_dsl.server import serve_command
    return serve_command(args)


def _plot(args: argparse.Namespace) -> int:
    from interp_dsl.ivx.show import plot
    path = plot(Path(args.dir), args.name, Path(args.out) if args.out else None)
    print(f"wrote {path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
