"""MkDocs hook: adds the generated configuration reference to the site's files.

`reference/configuration.md` is written by `rld.docs.reference_markdown()` from
rld/config.py, conf/ and the registries at every build, so it cannot drift from the code.
"""

from __future__ import annotations

from mkdocs.structure.files import File, Files

REFERENCE = "reference/configuration.md"


def on_files(files: Files, config) -> Files:
    from rld.docs import reference_markdown

    old = files.get_file_from_path(REFERENCE)
    if old is not None:
        files.remove(old)
    files.append(File.generated(config, REFERENCE, content=reference_markdown()))
    return files
