"""The building blocks of the static report page: escaped text, tables, embedded images and
the document with its screen and print style sheet.

Everything the page shows is inside the one HTML file: images are embedded as data URIs and
the style sheet is inline, so the page loads nothing, works from a mail attachment or a USB
stick, and cannot show a figure of a later run that overwrote the file beside it.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fuse.report import format_value
from pipeline.errors import UserError

NUMBER_LIKE = re.compile(r"^(–|[<>]?-?\d)")
STYLE = """
:root { --ink: #1d2330; --muted: #5a6272; --rule: #d5d9e0; --accent: #1f5fa8;
        --band: #f3f5f8; font-family: system-ui, "Segoe UI", Roboto, "Noto Sans",
        "Noto Sans CJK SC", sans-serif; color: var(--ink); }
body { margin: 0; line-height: 1.45; font-size: 15px; }
main { max-width: 1180px; margin: 0 auto; padding: 1.5rem 2rem 4rem; }
header.page { border-bottom: 3px solid var(--accent); margin-bottom: 1rem; }
h1 { font-size: 1.7rem; margin: 0.2rem 0; }
h2 { font-size: 1.35rem; margin-top: 2.2rem; border-bottom: 1px solid var(--rule); }
h3 { font-size: 1.08rem; margin: 1.4rem 0 0.4rem; }
p, li { max-width: 80ch; }
.muted, figcaption, caption { color: var(--muted); font-size: 0.88rem; }
nav.contents ol { columns: 2; padding-left: 1.2rem; max-width: 60ch; }
.headline table { font-size: 0.95rem; border-left: 4px solid var(--accent); }
.headline th, .headline td { text-align: left; padding: 0.35rem 0.9rem; }
.headline .value { font-size: 1.3rem; font-weight: 600; margin-right: 0.4rem; }
.scroll { overflow-x: auto; margin: 0.4rem 0 1rem; }
table { border-collapse: collapse; font-size: 0.84rem; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; padding: 0.2rem 0; }
th, td { border-bottom: 1px solid var(--rule); padding: 0.22rem 0.5rem; text-align: right;
         vertical-align: top; }
th { background: var(--band); font-weight: 600; }
th:first-child, td:first-child, .text { text-align: left; }
.wrap { word-break: break-all; font-family: ui-monospace, monospace; font-size: 0.78rem; }
figure { margin: 0.8rem 0 1.4rem; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--rule); }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(30rem, 1fr));
           gap: 0.5rem 1.2rem; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(13rem, 1fr));
           gap: 0.8rem; }
.gallery figure { margin: 0; }
.gallery img { width: 100%; }  /* an overlay at its natural size can be a thumbnail */
.notice { background: #fff6e0; border-left: 4px solid #d39b00; padding: 0.5rem 0.9rem; }
@page { size: A4; margin: 14mm 12mm; }
@media print {
  body { font-size: 9.5pt; }
  main { max-width: none; padding: 0; }
  nav.contents { display: none; }
  h2 { break-before: page; break-after: avoid; }
  h2.first { break-before: auto; }
  h3, caption { break-after: avoid; }
  .scroll { overflow: visible; }
  table { width: 100%; font-size: 7pt; }
  th, td { padding: 0.1rem 0.25rem; }
  th { overflow-wrap: anywhere; }  /* a long column name breaks rather than cut the table */
  thead { display: table-header-group; }  /* a table over two pages repeats its header */
  tr, figure { break-inside: avoid; }
  .figures { display: block; }
  figure img { max-height: 120mm; width: auto; }
  .gallery { grid-template-columns: repeat(4, 1fr); }
  a { color: inherit; text-decoration: none; }
}
"""


def escape(value: Any) -> str:
    """`value` as HTML text."""
    return html.escape(str(value), quote=True)


def element(tag: str, content: str = "", **attributes: Any) -> str:
    """`<tag ...>content</tag>`; `content` is HTML already, attribute values are escaped.

    An attribute named `class_` or `data_x` is written `class` or `data-x`.
    """
    written = "".join(
        f' {name.rstrip("_").replace("_", "-")}="{escape(value)}"'
        for name, value in attributes.items()
        if value is not None
    )
    return f"<{tag}{written}>{content}</{tag}>"


def paragraphs(sentences: Iterable[str], **attributes: Any) -> str:
    """One paragraph per sentence (or note)."""
    return "".join(element("p", escape(sentence), **attributes) for sentence in sentences)


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    caption: str = "",
    text_columns: Collection[int] = (),
) -> str:
    """A table of cells that are HTML already (escape text cells first), in a scroll box on
    screen; numbers align right, the first column and `text_columns` (positions) left."""
    # a long column name may break after an underscore, so that wide tables fit A4
    names = (escape(name).replace("_", "_<wbr>") for name in header)
    head = element(
        "thead",
        element(
            "tr",
            "".join(
                element("th", name, class_="text" if column in text_columns else None)
                for column, name in enumerate(names)
            ),
        ),
    )
    body = element(
        "tbody",
        "".join(
            element(
                "tr",
                "".join(
                    element("td", cell, class_="text" if column in text_columns else None)
                    for column, cell in enumerate(row)
                ),
            )
            for row in rows
        ),
    )
    return element(
        "div",
        element("table", (element("caption", escape(caption)) if caption else "") + head + body),
        class_="scroll",
    )


def _is_text(value: Any) -> bool:
    # "0.912 (0.010)", "<0.001" and "–" are numbers as the report prints them
    return isinstance(value, str) and not NUMBER_LIKE.match(value)


def records_table(records: Sequence[Mapping[str, Any]], caption: str = "") -> str:
    """A table of JSON records (tables.json's form), each value printed as tables.md does."""
    columns = list(dict.fromkeys(column for record in records for column in record))
    text = {
        position
        for position, column in enumerate(columns)
        if any(_is_text(record.get(column)) for record in records)
    }
    rows = [
        [escape(format_value(column, record.get(column))) for column in columns]
        for record in records
    ]
    return table(columns, rows, caption, text)


def image(path: Path, alt: str, named_by: str) -> str:
    """An <img> holding the PNG at `path` as a data URI.

    Args:
        named_by: which file named this image, for the error when it is missing.

    Raises:
        UserError: the file is missing or unreadable.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(
            f"{named_by} names {path}, which cannot be read ({error.strerror or error}); "
            "rerun the stage that writes it"
        ) from None
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{escape(alt)}">'


def figure(image_html: str, caption: str) -> str:
    """An image with its caption."""
    return element("figure", image_html + element("figcaption", escape(caption)))


def document(title: str, header_html: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole page: a header, a table of contents, then each (id, heading, body) section.

    Args:
        title: the page title (the browser tab, the printout's header).
        header_html: what goes under the title (HTML).
        sections: (anchor id, heading text, body HTML) in page order.
    """
    contents = element(
        "nav",
        element("h3", "Contents")
        + element(
            "ol",
            "".join(
                element("li", element("a", escape(heading), href=f"#{anchor}"))
                for anchor, heading, _ in sections
            ),
        ),
        class_="contents",
    )
    body = "".join(
        element(
            "section",
            element("h2", escape(heading), class_="first" if position == 0 else None) + content,
            id=anchor,
        )
        for position, (anchor, heading, content) in enumerate(sections)
    )
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # nothing may load from outside: no script at all, images and styles inline only
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n"
        "<body><main>"
        + element("header", element("h1", escape(title)) + header_html, class_="page")
        + f"{contents}{body}</main></body></html>\n"
    )
