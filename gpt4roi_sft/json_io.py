"""Reading whole JSON files with errors a user can act on (the file, and where in it parsing failed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from gpt4roi_sft.errors import DataError


def load_json(path: Union[str, Path]) -> Any:
    """Parse a whole JSON file; a missing, truncated or invalid file is a :class:`DataError` naming it."""
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} (char {exc.pos}): {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text at byte {exc.start}") from None
