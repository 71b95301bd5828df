"""Server-sent-event helpers shared by the two proxies."""

from __future__ import annotations

# A comment line: ignored by every SSE client, but proves the link is alive.
HEARTBEAT = b": keepalive\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

# Cortex to neuron: the model name the client asked for (an alias of the id cortex
# sends), which the answer must carry. Never copied from a client.
ANSWER_MODEL_HEADER = "X-Answer-Model"

# Hop-by-hop and identity headers never copied between client and upstream.
HOP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Content-Length",
        "Content-Encoding",
        "Host",
        "Authorization",
        "Cookie",
        "X-Forwarded-For",
        "X-Forwarded-Host",
        "X-Forwarded-Proto",
        "X-Real-IP",
        "X-Request-Id",
        "X-Api-Key",
        ANSWER_MODEL_HEADER,
    )
)
