"""MkDocs hook: `<!-- reference: NAME -->` in a page becomes `distributed_mtml.reference.PAGES[NAME]()`,
so the reference pages are written from the code at every build."""

import re

from distributed_mtml.reference import PAGES

MARKER = re.compile(r"<!-- reference: (\w+) -->")


def on_page_markdown(markdown, page, config, files):
    def generated(match):
        name = match.group(1)
        if name not in PAGES:
            raise ValueError(f"{page.file.src_path}: no generated reference named '{name}' (known: {', '.join(PAGES)})")
        return PAGES[name]()

    return MARKER.sub(generated, markdown)
