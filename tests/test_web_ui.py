"""The web UI's files: what the daemon serves, with which headers, and that a built wheel
carries them. The browser tests (tests/test_web_ui_browser.py) check what the page does."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from mta.web import ui
from tests.support.daemon import ROOT

STATIC = ROOT / "mta" / "web" / "static"

pytestmark = pytest.mark.timeout(60)


async def serve_ui() -> tuple[web.AppRunner, str]:
    app = web.Application()
    ui.add_routes(app, None)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def test_each_file_is_served_with_its_type_and_the_strict_policy():
    runner, base = await serve_ui()
    try:
        async with aiohttp.ClientSession() as session:
            for path, name, content_type in [
                ("/", "index.html", "text/html; charset=utf-8"),
                ("/static/app.js", "app.js", "text/javascript; charset=utf-8"),
                ("/static/app.css", "app.css", "text/css; charset=utf-8"),
                ("/static/favicon.svg", "favicon.svg", "image/svg+xml"),
                ("/static/paperclip.svg", "paperclip.svg", "image/svg+xml"),
            ]:
                async with session.get(base + path) as resp:
                    assert resp.status == 200, path
                    assert await resp.read() == (STATIC / name).read_bytes()
                    assert resp.headers["Content-Type"] == content_type
                    assert resp.headers["Content-Security-Policy"] == (
                        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
                        " connect-src 'self'; frame-src 'self'; object-src 'none'; base-uri 'none';"
                        " form-action 'self'; frame-ancestors 'none'")
                    assert resp.headers["X-Content-Type-Options"] == "nosniff"
                    assert resp.headers["X-Frame-Options"] == "DENY"
                    assert resp.headers["Referrer-Policy"] == "no-referrer"
                    assert resp.headers["Cache-Control"] == "no-cache"
            # Mailpit's address of one message is the page, which opens it.
            async with session.get(base + "/view/0A1B2C3D4E5F") as resp:
                assert resp.status == 200
                assert await resp.read() == (STATIC / "index.html").read_bytes()
                assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
            async with session.get(base + "/static/nothing.js") as resp:
                assert resp.status == 404
            async with session.head(base + "/static/app.js") as resp:
                assert resp.status == 200
    finally:
        await runner.cleanup()


def test_the_page_loads_nothing_from_outside():
    """No CDN, no web fonts: every src/href of the page is on its own origin."""
    html = (STATIC / "index.html").read_text()
    refs = re.findall(r'\b(?:src|href)="([^"]*)"', html)
    assert refs and all(r.startswith(("/", "#")) for r in refs), refs
    for name in ("app.js", "app.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"https?://|@import|url\(", text), name
    # No inline script or style: the CSP allows neither.
    assert "<style" not in html and not re.search(r"\s(?:style|on[a-z]+)=", html)
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/app.js" defer>']


def test_the_script_puts_mail_into_the_page_only_as_text():
    """Mail is hostile: app.js never parses a string as markup or code."""
    js = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "srcdoc", "createContextualFragment", "DOMParser"):
        assert sink not in js, sink
    # The HTML part is only ever the sandboxed frame's src; the frame allows nothing.
    html = (STATIC / "index.html").read_text()
    assert re.search(r'<iframe id="msg-html" sandbox="" ', html)


def test_a_built_wheel_carries_the_ui(tmp_path: Path):
    """pip builds the wheel from a copy of the sources (a build writes build/ beside them),
    and mta.web.ui, imported from the unpacked wheel, reads every file it serves."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("mta", "man"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                   check=True, timeout=120, capture_output=True)
    [wheel] = out.glob("mta-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {f"mta/web/static/{n}" for n in ui.STATIC_FILES.values()} <= names
        z.extractall(tmp_path / "installed")
    check = ("import sys; from mta.web import ui; files = ui.load_static();"
             " print(ui.__file__); print(sorted((p, len(f.body)) for p, f in files.items()))")
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(tmp_path / "installed"), "PATH": "/usr/bin:/bin"},
                            timeout=60, check=True)
    where, sizes = result.stdout.splitlines()
    assert where == str(tmp_path / "installed" / "mta" / "web" / "ui.py")
    assert sizes == str(sorted((path, (STATIC / name).stat().st_size) for path, name in ui.STATIC_FILES.items()))
