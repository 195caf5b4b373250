"""`clipsearch serve`'s web app: a JSON API over a `Library` plus one page (`app.create_app`; API in `app`'s doc).

Needs the `serve` extra (`pip install 'clipsearch[serve]'`: Starlette and uvicorn); nothing else imports it.
"""
