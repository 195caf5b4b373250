"""`clipsearch serve`: search and browse the store in a web browser (needs the `serve` extra)."""

from __future__ import annotations

import socket
import webbrowser
from pathlib import Path
from typing import IO, Any

import click

NEEDS_EXTRA = "the web app needs `pip install 'clipsearch[serve]'`"


class OneLineUsageError(click.UsageError):
    """A usage error (exit status 2) shown as one line: the message says what to pass instead."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"Error: {self.format_message()}", file=file, err=True)


@click.command("serve")
@click.option(
    "--db",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="CLIPSEARCH_HOME",
    help="Store directory [env CLIPSEARCH_HOME; default ~/.local/share/clipsearch].",
)
@click.option("--model", envvar="CLIPSEARCH_MODEL", help="Model name or checkpoint path [env CLIPSEARCH_MODEL].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; any but a loopback address needs --token.")  # fmt: skip
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--token", envvar="CLIPSEARCH_TOKEN",
              help="Access token every request must carry (header or cookie) [env CLIPSEARCH_TOKEN].")  # fmt: skip
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default web browser.")
@click.option("--max-upload-mb", default=25.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest query image a page may upload.")  # fmt: skip
@click.option("--max-megapixels", default=100.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Refuse uploads (and originals to thumbnail) with more pixels: decompression bombs.")  # fmt: skip
def serve(
    db: Path | None,
    model: str | None,
    host: str,
    port: int,
    token: str | None,
    open_browser: bool,
    max_upload_mb: float,
    max_megapixels: float,
) -> None:
    """Search and browse the store in a web browser.

    One process loads the model's text tower once, keeps the store and its search index open, and serves a
    page and a JSON API (documented in clipsearch/web/app.py). `clipsearch index` may run meanwhile: new
    images show up without a restart. Listens on 127.0.0.1 only, unless --host says otherwise; then every
    request needs the token: open the page once as http://HOST:PORT/?token=TOKEN (it sets a cookie), or send
    `Authorization: Bearer TOKEN`.

    \b
    Examples:
      clipsearch serve                         # then open http://127.0.0.1:8765/
      clipsearch serve --db ./demo-store --port 9000 --open
      CLIPSEARCH_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe())') \\
        clipsearch serve --host 0.0.0.0
    """
    try:
        import python_multipart  # noqa: F401  (the uploads' form parser)
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise click.ClickException(NEEDS_EXTRA) from e
    from clipsearch.web.security import check_token, is_loopback

    if token is None and not is_loopback(host):
        raise OneLineUsageError(
            f"--host {host} would show your photos to the network: also pass --token (or set CLIPSEARCH_TOKEN)"
        )
    if token is not None:
        try:
            check_token(token)
        except ValueError as e:
            raise OneLineUsageError(f"--token: {e}") from e
    listener = _listen(host, port)
    from clipsearch.library import Library
    from clipsearch.web.app import create_app, start_warm_up

    library = Library(db=db, model=model, row_cache=True)
    if not library.db.is_dir() or not any(library.db.glob("*.lance")):  # before serving, without loading anything
        raise click.ClickException(f"no image store at {library.db}; run `clipsearch index FOLDER` first")
    app = create_app(library, host=host, port=port, token=token, max_upload_mb=max_upload_mb,
                     max_megapixels=max_megapixels)  # fmt: skip
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{port}/"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    failed: list[Exception] = []

    def ready(images: int | None, error: Exception | None) -> None:
        if error is not None:
            failed.append(error)
            server.should_exit = True
            return
        click.echo(
            f"Serving {images} images ({library.model_name}) from {library.db} at {url}  (Ctrl-C stops)", err=True
        )
        if open_browser:
            webbrowser.open(url + (f"?token={token}" if token else ""))

    # The page is served at once; the model, the store and the index load meanwhile, and searches wait for them.
    start_warm_up(app, ready)
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly, then passes the Ctrl-C on: stopping is not an error
        pass
    if failed:
        raise click.ClickException(str(failed[0]))


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, so a port in use fails with one line before any model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP, and
    # with Nagle on, each answer's headers and body wait for the client's delayed ACK: +40 ms a request.
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host.strip("[]"), port))
    except OSError as e:
        listener.close()
        raise click.ClickException(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port") from e
    listener.listen(128)
    return listener
