"""Where every benchmark's result goes: the JSON at the `--out` path, the markdown table beside it
(same name, `.md`), and the table on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(out: Path, data: Any, table: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)
