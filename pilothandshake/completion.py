"""Shell completion for ``pilot-handshakectl``, generated from its argparse parser
(``pilot-handshakectl completion bash|zsh``): the commands, each command's options, the
top-level options, and for ``completion`` its shells. Node IDs are not completed (they live
in the daemon)."""

from __future__ import annotations

import argparse

__all__ = ["script"]


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
    )


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(parser: argparse.ArgumentParser, name: str) -> str:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest == name:
                    return str(choice.help or "")
    return ""


def _choices(parser: argparse.ArgumentParser) -> list[str]:
    return [
        str(choice)
        for action in parser._actions
        if not action.option_strings
        and action.choices
        and not isinstance(action, argparse._SubParsersAction)
        for choice in action.choices
    ]


def _bash(parser: argparse.ArgumentParser) -> str:
    prog = parser.prog
    commands = _commands(parser)
    cases = "\n".join(
        f'        {name}) words="{" ".join(_options(sub) + _choices(sub))}" ;;'
        for name, sub in commands.items()
    )
    function = "_" + prog.replace("-", "_")
    return f"""# bash completion for {prog} (generated: {prog} completion bash)
{function}() {{
    local cur command="" i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            --socket|--config) ((i++)) ;;
            -*) ;;
            *) command="${{COMP_WORDS[i]}}"; break ;;
        esac
    done
    case "${{COMP_WORDS[COMP_CWORD-1]}}" in
        --socket|--config) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    esac
    local words
    case "$command" in
        "") words="{" ".join([*commands, *_options(parser)])}" ;;
{cases}
        *) words="" ;;
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -F {function} {prog}
"""


def _zsh_quote(text: str) -> str:
    return text.replace("'", "'\\''").replace(":", "\\:").replace("[", "\\[").replace("]", "\\]")


def _zsh(parser: argparse.ArgumentParser) -> str:
    prog = parser.prog
    commands = _commands(parser)
    described = "\n".join(
        f"        '{name}:{_zsh_quote(_help(parser, name))}'" for name in commands
    )
    cases = []
    for name, sub in commands.items():
        specs = [_zsh_option(sub, option) for option in _options(sub)]
        choices = _choices(sub)
        if choices:
            specs.append(f"'1:{name}:({' '.join(choices)})'")
        cases.append(f"        {name}) _arguments {' '.join(specs) or ''} ;;")
    top = " ".join(_zsh_option(parser, option) for option in _options(parser))
    function = "_" + prog
    case_text = "\n".join(cases)
    return f"""#compdef {prog}
# zsh completion for {prog} (generated: {prog} completion zsh)
{function}() {{
    local -a commands
    commands=(
{described}
    )
    local curcontext="$curcontext" state line
    _arguments -C {top} '1:command:->command' '*::argument:->argument'
    case $state in
        command) _describe -t commands command commands ;;
        argument)
            case $line[1] in
{case_text}
            esac ;;
    esac
}}
{function} "$@"
"""


def _zsh_option(parser: argparse.ArgumentParser, option: str) -> str:
    """``'--name[help]'``, with ``:VALUE:`` for an option that takes one (files for paths)."""
    for action in parser._actions:
        if option in action.option_strings:
            text = str(action.help or "").replace("%(prog)s", parser.prog).replace("%%", "%")
            spec = f"{option}[{_zsh_quote(text)}]"
            if action.nargs != 0:
                metavar = str(action.metavar or action.dest.upper())
                spec += f":{metavar}:" + ("_files" if metavar in ("PATH", "FILE") else "")
            return f"'{spec}'"
    return f"'{option}'"


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for ``shell`` ("bash" or "zsh") of ``parser``'s program."""
    return _bash(parser) if shell == "bash" else _zsh(parser)
