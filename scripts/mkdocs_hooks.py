"""mkdocs hook: links from docs/ to repository files outside it (examples/, benchmarks/).

Pages link such files relatively (`../examples/ratelimit.toml`) so they work on
GitHub. The site does not contain them: with `repo_url` set in mkdocs.yml the link
goes to the file in the repository, else it becomes the path as code. A link to a
file that does not exist fails the build either way.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

# [text](target) outside code spans; images (![...]) are left to mkdocs.
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>[^)\s]+)\)")
_CODE = re.compile(r"(```.*?```|`[^`\n]*`)", re.DOTALL)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    page_dir = posixpath.dirname(page.file.src_uri)
    repo_url = (config.get("repo_url") or "").rstrip("/")

    def rewrite(match: re.Match[str]) -> str:
        target = match["target"]
        if "://" in target or target.startswith(("#", "mailto:", "/")):
            return match[0]
        path, _, anchor = target.partition("#")
        resolved = (docs / page_dir / path).resolve()
        if resolved.is_relative_to(docs):
            return match[0]  # a page or asset of the site: mkdocs checks it
        if not resolved.is_relative_to(repo) or not resolved.exists():
            raise FileNotFoundError(f"{page.file.src_uri}: link to a missing file: {target}")
        rel = resolved.relative_to(repo).as_posix()
        if repo_url:
            kind = "tree" if resolved.is_dir() else "blob"
            fragment = f"#{anchor}" if anchor else ""
            return f"[{match['text']}]({repo_url}/{kind}/main/{rel}{fragment})"
        text = match["text"]
        return f"`{rel}`" if text.strip("`") == rel.rstrip("/") else f"{text} (`{rel}`)"

    # Rewrite outside code only: split on code spans and fences, keep them as they are.
    parts = _CODE.split(markdown)
    for i in range(0, len(parts), 2):
        parts[i] = _LINK.sub(rewrite, parts[i])
    return "".join(parts)
