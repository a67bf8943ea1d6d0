"""A file's text: what a parse worker (`parseworker`) runs. Kept light (no web framework or
database imports), since every PDF or HTML file starts a worker process that imports it."""

from __future__ import annotations

import io
from pathlib import Path


def extension(filename: str) -> str:
    return Path(filename).suffix.lower()


def extract_text(filename: str, data: bytes) -> str:
    """The text of an accepted file (PDF: page by page; HTML: what a reader sees)."""
    ext = extension(filename)
    if ext == ".pdf":
        from pypdf import PdfReader

        reader = PdfReader(io.BytesIO(data))
        return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages)
    if ext == ".html":
        return html_text(data.decode("utf-8-sig"))
    return data.decode("utf-8-sig")


# Elements whose content is code or markup, never text a reader sees.
_NOT_TEXT = ["script", "style", "noscript", "template", "svg", "math", "iframe", "object"]


def html_text(html: str) -> str:
    """A page's readable text by Beautiful Soup (the standard library's parser underneath):
    entities decoded, scripts, styles and comments dropped, one line per block."""
    from bs4 import BeautifulSoup, Comment

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(_NOT_TEXT):
        tag.decompose()
    for comment in soup.find_all(string=lambda s: isinstance(s, Comment)):
        comment.extract()
    lines = (" ".join(line.split()) for line in soup.get_text(" ").splitlines())
    return "\n".join(line for line in lines if line)


def preload(ext: str) -> None:
    """Import the parser for `ext` (so a parse worker caps the document's memory, not its own)."""
    if ext == ".pdf":
        import pypdf  # noqa: F401
    elif ext == ".html":
        import bs4  # noqa: F401
