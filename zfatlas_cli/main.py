"""The ``zfatlas`` console command: one argparse tree, one module per group of subcommands.

Each module in :data:`COMMAND_MODULES` exposes ``register(subparsers)``, which adds its
subcommands and sets ``func`` (called with the parsed args, returning the exit code). Commands
import what they need (torch, Ray, pyarrow) when they run, so ``zfatlas --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from zfatlas_cli import output
from zfatlas_cli.failures import EXIT_BAD_INPUT, fail

# In the order `zfatlas --help` lists their commands (see EPILOG's groups).
COMMAND_MODULES = [
    "zfatlas_cli.demo",
    "zfatlas_cli.specs",
    "zfatlas_cli.architectures",
    "zfatlas_cli.datasets",
    "zfatlas_cli.submit",
    "zfatlas_cli.scheduler",
    "zfatlas_cli.query",
]

# A local Ray started by the CLI binds loopback only (see README, "Network and Ray").
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

DESCRIPTION = """\
zfatlas trains convolutional networks and builds feature atlases of them, after Zeiler & Fergus, \
"Visualizing and Understanding Convolutional Networks" (ECCV 2014): for every channel of the \
layers you choose, the dataset images that excite it most, projected back to pixels with the \
deconvnet. A job is a YAML spec (train, atlas, occlusion, invariance, correspondence, probe) run \
on Ray, a local one or the cluster in RAY_ADDRESS, and committed to an artifact store (a folder or \
s3://bucket/prefix), where the commands below list, query, diff and serve it in a web viewer."""

EPILOG = """\
command groups:
  run jobs here          demo, validate, schema, run, layers, dataset
  run jobs on a cluster  submit, jobs, scheduler, schedule
  read results           runs, atlas, serve

examples:
  zfatlas demo                           # train a small ZFNet, build its atlas
  zfatlas run examples/atlas-small.yaml --set k=16 --set layers=[conv5]
  zfatlas runs list --kind atlas --json  # committed runs, one JSON per line
  zfatlas serve --store s3://bucket/atlases    # http://127.0.0.1:8000

environment:
  RAY_ADDRESS             Ray cluster of run and demo (default: a local Ray)
  RAY_API_SERVER_ADDRESS  Ray Jobs API of submit, jobs and scheduler
                          (default http://127.0.0.1:8265)
  ZFATLAS_STORE           default --store of runs and atlas (else
                          $ZFATLAS_API_STORE, else ./artifacts)
  ZFATLAS_API_*           settings of serve (ZFATLAS_API_STORE, _HOST, _PORT,
                          _TOKEN, ...); its flags override them

'zfatlas COMMAND --help' describes a command and its defaults. Output is \
quiet: results on stdout, one 'zfatlas: <reason>' line on stderr when a command fails (exit 1; \
2 for bad input; 130 when interrupted); -v adds logs with timestamps and tracebacks, -vv debug \
logs."""

VERBOSE_HELP = "more output: logs with timestamps and tracebacks (-vv: debug logs)"


class HelpFormatter(argparse.HelpFormatter):
    """Wraps paragraphs but keeps indented blocks (examples, tables) as written, and shows each
    option's default unless its help already names one."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for block in text.strip("\n").split("\n\n"):
            lines = block.splitlines()
            if any(line.startswith(" ") for line in lines):
                blocks.append("\n".join(indent + line for line in lines))
            else:
                blocks.append(textwrap.fill(" ".join(block.split()), width, initial_indent=indent,
                                            subsequent_indent=indent))
        return "\n\n".join(blocks)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS)
        if not shown or not action.option_strings or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors read like every other failure of the command:
    ``zfatlas: <message> (see 'zfatlas COMMAND --help')`` on stderr, exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"zfatlas: {message} (see '{self.prog} --help')\n")


class _Version(argparse.Action):
    """``--version``: computed when asked for (it runs git), not each time the parser is built."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(version())
        parser.exit()


def version() -> str:
    """``zfatlas 0.1.0`` and, from a git checkout, its short commit (``+ changes`` when the
    working tree has uncommitted ones): the same provenance a run's manifest records."""
    from jobs.store.provenance import code_version

    info = code_version()
    text = f"zfatlas {info.get('package') or 'unknown version'}"
    sha = info.get("git_sha")
    if isinstance(sha, str) and sha:
        text += f" (commit {sha[:7]}{' + changes' if info.get('git_dirty') else ''})"
    return text


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser below ``parser``, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                if child.description is None and helps.get(name):
                    text = str(helps[name])
                    child.description = text[0].upper() + text[1:] + "."
                yield child
                yield from _subparsers(child)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="zfatlas", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action=_Version, help="print the version (and git commit) and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for child in _subparsers(parser):
        # -v works after the command too (`zfatlas jobs status ID -v`); SUPPRESS keeps the
        # top-level count when it is not given there.
        child.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    output.configure(args.verbose)
    try:
        with output.handling_interrupts():
            try:
                return int(args.func(args) or 0)
            except KeyboardInterrupt:  # commands that keep something on Ctrl-C say what themselves
                return fail("interrupted", output.EXIT_INTERRUPTED)
    except KeyboardInterrupt:  # pressed before the handler was in place
        return fail("interrupted", output.EXIT_INTERRUPTED)
    except BrokenPipeError:  # the reader went away (`zfatlas layers ... | head`): not an error
        sys.stderr.close()
        return 0
    finally:
        output.forget_colorama()
        output.unconfigure()


if __name__ == "__main__":
    sys.exit(main())
