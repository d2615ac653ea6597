"""The man pages in man/: they render cleanly, they cover what the code accepts, and
they are installed and referenced.

Coverage is checked against the code, not against a list kept here: every command
and option of the real `mta` argparse parsers must appear in mta.8, every option
letter mta/sendmail.py's parse_args takes in mta-sendmail.1, and every key of the
reference config (config/mta.yaml, its commented examples included) and every key
name the loader reads (mta/config.py) in mta.yaml.5.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mta import sendmail
from mta.cli import _parser
from tests.support.daemon import ROOT

pytestmark = pytest.mark.timeout(60)

MAN = ROOT / "man"
PAGES = {"mta.8": ("MTA", "8"), "mta-sendmail.1": ("MTA\\-SENDMAIL", "1"), "mta.yaml.5": ("MTA.YAML", "5")}
REFERENCE_CONFIG = ROOT / "config" / "mta.yaml"
# Mappings in the reference config whose keys are the operator's data, not config keys.
DATA_MAPPINGS = {"delivery.routes"}


# Requests whose arguments are layout, not text (.TP 38, .in +4n, .ad l).
_LAYOUT = {"ad", "br", "fi", "hy", "in", "na", "nf", "nh", "PD", "RE", "RS", "sp", "ti", "TP", "TQ"}


def deroff(line: str) -> str:
    """One line of roff as plain text: '\\-' is '-', fonts and escapes gone, a request's
    arguments kept (.B --config -> --config), a section heading as '== NAME =='."""
    if line.startswith("."):
        request, _, args = line[1:].partition(" ")
        if request == "SH":
            line = f"== {args.strip(chr(34))} =="
        elif request in _LAYOUT:
            line = ""
        else:
            line = args.replace('"', " ")
    line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "").replace("\\~", " ")
    line = line.replace("\\(->", "->").replace("\\(dq", '"')
    line = re.sub(r"\\f[BIRP]|\\f\(..|\\\(..|\\\*\(..|\\\*.", "", line)
    return re.sub(r"[ \t]+", " ", line).strip()


def page_text(name: str) -> str:
    """The page as plain text, one source line per line, comments dropped."""
    return "\n".join(deroff(line) for line in (MAN / name).read_text().splitlines()
                     if not line.startswith(('.\\"', "'\\\"")))


def terms(name: str) -> list[str]:
    """What the page defines: the tags of its .TP/.TQ items and its .SS headings, as text.
    A name that is only mentioned in passing (in the Postfix table, in prose) is not here."""
    lines = (MAN / name).read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if re.match(r"\.(TP|TQ)\b", line) and i + 1 < len(lines):
            out.append(deroff(lines[i + 1]))
        elif line.startswith(".SS "):
            out.append(deroff(line))
    return out


def section(name: str, heading: str) -> str:
    """The text of one .SH section of a page."""
    parts = page_text(name).split(f"\n== {heading} ==\n", 1)
    assert len(parts) == 2, f"{name}: no section {heading}"
    return parts[1].split("\n== ", 1)[0]


def mentions(text: str, word: str) -> bool:
    """``word`` as a whole token: -c is not found inside --config, tls.cert not inside xtls.certs."""
    return re.search(rf"(?<![\w.-]){re.escape(word)}(?![\w-]|\.\w)", text) is not None


# --------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("name", sorted(PAGES))
def test_page_renders_without_warnings(name):
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed")
    result = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(MAN / name)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("name", sorted(PAGES))
def test_page_header_matches_its_file_name(name):
    title, section = PAGES[name]
    th = next(line for line in (MAN / name).read_text().splitlines() if line.startswith(".TH "))
    assert th.split()[1:3] == [title, section]
    assert name.rsplit(".", 1)[1] == section


def test_see_also_names_the_other_pages():
    for name in PAGES:
        see_also = " ".join(section(name, "SEE ALSO").split())
        for other in PAGES:
            if other != name:
                page, number = other.rsplit(".", 1)
                assert f"{page} ({number})" in see_also, f"{name}: SEE ALSO lacks {page}({number})"


# --------------------------------------------------------------------------- mta(8)

def walk_parser(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.Action]]:
    """(command path, action) for every action of every (sub)parser."""
    for action in parser._actions:
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk_parser(sub, path + (name,))


def test_mta8_has_every_command_and_option():
    """Each command has a heading or an item of its own, and each option is in one."""
    defined = terms("mta.8")
    text = page_text("mta.8")
    missing = []
    for path, action in walk_parser(_parser()):
        command = " ".join(path)
        if path and not any(t.removeprefix("mta ").startswith(command) for t in defined):
            missing.append(f"command {command}")
        for option in action.option_strings:
            if not any(mentions(t, option) for t in defined):
                missing.append(f"{command or 'mta'}: {option}")
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            missing += [f"{command}: {action.dest} value {c}" for c in action.choices if not mentions(text, str(c))]
    assert not missing, "mta.8 does not document: " + ", ".join(sorted(set(missing)))


def test_mta8_names_environment_signals_and_endpoints():
    text = page_text("mta.8")
    for word in ("MTA_CONFIG", "STATE_DIRECTORY", "MTA_DELIVERY_PROCESS", "MTA_EVENT_LOOP", "MTA_LOG",
                 "SIGTERM", "SIGHUP", "/healthz", "/metrics", "mta/smtpd[812]:"):
        assert word in text, word
    for heading in ("ENVIRONMENT", "SIGNALS", "HEALTH AND METRICS", "LOGGING", "EXIT STATUS", "FILES"):
        assert section("mta.8", heading).strip(), heading


# --------------------------------------------------------------------------- mta-sendmail(1)

def sendmail_options() -> set[str]:
    """Every option parse_args accepts, as it is written on a command line."""
    letters = sendmail._WITH_VALUE | sendmail._FLAGS | {"q"}
    # Every -b mode parse_args takes: probe each letter against the real parser.
    modes = set()
    for mode in "abcdefghijklmnopqrstuvwxyz":
        try:
            sendmail.parse_args([f"-b{mode}"])
        except sendmail.UsageError:
            continue
        modes.add(mode)
    assert modes == {"m", "s", "p"}
    return {f"-{letter}" for letter in letters - {"b"}} | {f"-b{mode}" for mode in modes} | {"-oi"}


def test_sendmail_page_has_every_option():
    text = page_text("mta-sendmail.1")
    missing = sorted(option for option in sendmail_options() if not mentions(text, option))
    assert not missing, f"mta-sendmail.1 does not mention {missing}"


def test_sendmail_page_has_exit_statuses_and_config_lookup():
    text = page_text("mta-sendmail.1")
    exits = section("mta-sendmail.1", "EXIT STATUS")
    for status in (sendmail.EX_OK, sendmail.EX_USAGE, sendmail.EX_DATAERR, sendmail.EX_UNAVAILABLE,
                   sendmail.EX_TEMPFAIL):
        assert re.search(rf"^{status}$", exits, re.MULTILINE), status
    assert sendmail.DEFAULT_CONFIG in text and "MTA_CONFIG" in text


# --------------------------------------------------------------------------- mta.yaml(5)

def _walk(value: Any, prefix: str, keys: set[str]) -> None:
    if isinstance(value, dict):
        for key, child in value.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            keys.add(path)
            if path not in DATA_MAPPINGS:
                _walk(child, path, keys)
    elif isinstance(value, list):
        for item in value:
            _walk(item, f"{prefix}[]", keys)


_KEY = re.compile(r"^(\s*)(?:- )?[a-z_][a-z0-9_]*:(?:\s|$)")


def _uncomment(line: str) -> str | None:
    """A comment line as it reads with its '#' (and one space) taken out, else None."""
    if not line.lstrip().startswith("#"):
        return None
    at = line.index("#")
    return line[:at] + line[at + 1:].removeprefix(" ")


def config_keys(path: Path = REFERENCE_CONFIG) -> set[str]:
    """Dotted key paths of the reference config: what it loads to, plus its commented-out
    examples (the submission listener's tls.*, smarthost's mapping form, queue.path, ...).

    A commented example is a run of comment lines that read as YAML once uncommented; it
    belongs under the nearest real key indented less than it (list items under listeners
    are 'listeners[]'), or at the top when it starts in column 0."""
    lines = path.read_text().splitlines()
    keys: set[str] = set()
    _walk(yaml.safe_load("\n".join(lines)), "", keys)

    real: list[tuple[int, str]] = []       # (indent, dotted path) of real key lines above
    run: list[str] = []

    def flush() -> None:
        if not run:
            return
        indent = min(len(m.group(1)) for m in map(_KEY.match, run) if m)
        parents = [p for i, p in real if i < indent]
        if parents or indent == 0:
            try:
                value = yaml.safe_load(textwrap.dedent("\n".join(run)))
            except yaml.YAMLError:
                value = None   # prose that happens to look like a key
            _walk(value, parents[-1] if parents else "", keys)
        run.clear()

    for line in lines:
        code = _uncomment(line)
        if code is not None:
            first = _KEY.match(run[0]) if run else None
            in_run = first is not None and (code.strip().startswith("#") or
                                            len(code) - len(code.lstrip()) > len(first.group(1)))
            if _KEY.match(code) or in_run:
                run.append(code)
                continue
        flush()
        m = _KEY.match(line)
        if m:   # a real key: remember it as a parent if it opens a mapping or a list item
            indent = len(m.group(1))
            while real and real[-1][0] >= indent:
                real.pop()
            parent = real[-1][1] if real else ""
            text = line.strip()
            if text.startswith("- "):
                parent = f"{parent}[]"
                real.append((indent, parent))
                indent, text = indent + 2, text[2:]
            name, _, value = text.partition(":")
            if not value.split("#", 1)[0].strip():
                real.append((indent, f"{parent}.{name}" if parent else name))
    flush()
    return keys


def documented_name(path: str) -> str:
    """How mta.yaml.5 writes a key: dotted from the top, or from the list item (listeners' tls.cert)."""
    return path.rsplit("[].", 1)[-1]


def test_reference_config_keys_are_collected():
    """The collector sees the commented examples too, at their real paths."""
    keys = config_keys()
    for expected in ("hostname", "listeners[].name", "listeners[].allow_insecure_auth", "listeners[].tls.cert",
                     "listeners[].tls.key", "listeners[].tls.implicit", "listeners[].tls.min_version",
                     "listeners[].tls.ciphers", "queue.path", "delivery.smarthost.address",
                     "delivery.smarthost.password", "delivery.retry.delay_warning", "metrics.address"):
        assert expected in keys, expected
    assert not any(key.startswith("delivery.routes.") for key in keys)
    assert "mode" not in keys   # the prose "mode: relay - accepts ..." above listeners is no key


def test_yaml5_has_every_key_of_the_reference_config():
    """Each key is the tag of an item (listener keys as tls.cert, the others as
    delivery.retry.min_backoff); a section is there through its keys."""
    defined = {word for t in terms("mta.yaml.5") for word in re.split(r"[\s,]+", t)}
    keys = config_keys()
    missing = []
    for key in keys:
        name = documented_name(key)
        if name not in defined and not any(word.startswith(f"{name}.") for word in defined):
            missing.append(key)
    assert not missing, f"mta.yaml.5 does not document {sorted(missing)}"


def loader_key_names() -> set[str]:
    """Every key name mta/config.py reads (also those config/mta.yaml leaves out, like bounce)."""
    source = (ROOT / "mta" / "config.py").read_text()
    names = set(re.findall(r"\.(?:get|section)\(\s*\"([a-z_][a-z0-9_]*)\"", source))
    # Sections read whole from their dataclass: _section(parent, "name", Class, key=converter, ...)
    # and _settings(section, Class, key=converter, ...); the keyword names are the keys.
    for call in re.findall(r"_(?:section|settings)\((.*?)\)\n", source, re.S):
        names |= set(re.findall(r"^\s*\w+, \"([a-z_][a-z0-9_]*)\"", call))
        names |= set(re.findall(r"\b([a-z_][a-z0-9_]*)=", call))
    assert {"hostname", "listeners", "tls", "ciphers", "bounce", "double_bounce_to", "offer_to_untrusted"} <= names
    return names


def test_yaml5_has_every_key_the_loader_reads():
    text = page_text("mta.yaml.5")
    words = set(re.findall(r"[a-z_][a-z0-9_]*", text))
    missing = sorted(loader_key_names() - words)
    assert not missing, f"mta.yaml.5 does not document {missing}"
    # Sections the reference file omits still get their full path.
    assert mentions(text, "bounce.double_bounce_to")


def test_yaml5_has_units_and_the_postfix_table():
    text = page_text("mta.yaml.5")
    for unit in ("ms", "5m", "2h", "5d", "1w", "10MB", "10MiB", "KiB", "GiB"):
        assert mentions(text, unit), unit
    table = section("mta.yaml.5", "POSTFIX EQUIVALENTS")
    for postfix, ours in (("myhostname", "hostname"), ("relayhost", "delivery.smarthost"),
                          ("transport_maps", "delivery.routes"), ("message_size_limit", "limits.message_size"),
                          ("maximal_queue_lifetime", "delivery.retry.max_lifetime"),
                          ("2bounce_notice_recipient", "bounce.double_bounce_to"),
                          ("local_recipient_maps", "mailboxes.users_file")):
        rows = [line.split(" -> ", 1) for line in table.splitlines() if " -> " in line]
        assert any(mentions(left, postfix) and mentions(right, ours) for left, right in rows), (postfix, ours)


# --------------------------------------------------------------------------- installed and referenced

def test_unit_documentation_names_our_pages():
    unit = (ROOT / "systemd" / "mta.service").read_text()
    docs = " ".join(m.group(1) for m in re.finditer(r"^Documentation=(.*)$", unit, re.MULTILINE)).split()
    ours = [d for d in docs if d.startswith("man:mta")]
    assert {"man:mta(8)", "man:mta.yaml(5)"} <= set(ours)
    for doc in ours:
        m = re.fullmatch(r"man:([\w.-]+)\((\d)\)", doc)
        assert m and (MAN / f"{m.group(1)}.{m.group(2)}").is_file(), f"{doc}: no such page in man/"


def test_pip_installs_every_page():
    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    installed = {(directory, source) for directory, sources in data_files.items() for source in sources}
    pages = sorted(p.name for p in MAN.iterdir() if re.search(r"\.[1-8]$", p.name))
    assert pages == sorted(PAGES)
    for page in pages:
        assert (f"share/man/man{page.rsplit('.', 1)[1]}", f"man/{page}") in installed, page
    for _directory, source in installed:
        assert (ROOT / source).is_file(), source


def test_docker_build_copies_the_pages():
    """pip install . in the image needs the data files: the wheel build fails without them."""
    copies = [line.split()[1:] for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ")]
    assert any(src in ("man", "man/") for *srcs, _dest in copies for src in srcs)
