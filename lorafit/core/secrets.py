"""Tokens are never shown: the one rule for what an access token looks like, and how it is hidden.

Used wherever text may carry one out of the process: recipe errors and the resolved recipe.yaml (recipe.py),
the command line kept in metrics.json, the hub's error messages (push). Imports nothing of lorafit's.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

# Access tokens by their shape: Hugging Face (hf_...), OpenAI-style keys (sk-...), GitHub (ghp_/gho_/...),
# Slack (xox?-...), AWS access key ids (AKIA...). A Hugging Face token is hidden as hf_***, the others as ***.
_HF_TOKEN = r"hf_[A-Za-z0-9]{16,}"
_OTHER_TOKENS = r"\b(?:sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|xox[abprs]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16})\b"
TOKEN = re.compile(f"(?P<hf>{_HF_TOKEN})|{_OTHER_TOKENS}")
# The environment variables a Hugging Face token is read from: their values are hidden wherever they appear.
TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# Option and --set key names whose value is a secret, whatever it looks like.
SECRET_NAME = re.compile(r"token|secret|passw(or)?d|api[_-]?key|auth", re.IGNORECASE)
MASK = "***"


def redact(text: str, *secrets: str | None) -> str:
    """*text* with every access token hidden: the values of $HF_TOKEN (and *secrets*, e.g. the token the hub
    login gave) and anything shaped like a token; Hugging Face ones become hf_***, the others ***."""
    for token in (*(os.environ.get(n, "") for n in TOKEN_ENV), *secrets):
        token = (token or "").strip()
        if len(token) >= 8:
            text = text.replace(token, "hf_" + MASK)
    return TOKEN.sub(lambda m: "hf_" + MASK if m["hf"] else MASK, text)


def holds_token(text: str) -> bool:
    return redact(text) != text


def command_line(argv: list[str] | None = None) -> list[str]:
    """sys.argv for metrics.json, with anything secret replaced by ***: tokens (redact), and a value following
    (or given to) an option or a --set key named like a secret."""
    argv = [redact(arg).replace("hf_" + MASK, MASK) for arg in (sys.argv if argv is None else argv)]
    out = [Path(argv[0]).name] if argv else []
    hide_next = False
    for arg in argv[1:]:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        name, eq, _ = arg.partition("=")
        if eq and SECRET_NAME.search(name):
            arg = f"{name}={MASK}"
        elif arg.startswith("-") and SECRET_NAME.search(arg):
            hide_next = True
        out.append(arg)
    return out
