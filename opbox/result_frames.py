"""A map's results stream as length-prefixed frames, the form the SDK asks for (``Accept: MEDIA_TYPE``).

``GET /batches/{b}/results`` answers NDJSON by default (one JSON line per result, the envelope in base64:
for curl). Asked for frames, it sends each result as a frame: ``HEAD`` (its kind, the length of its meta,
the length of its body), the meta (UTF-8, tab-separated: index, completion number, status, run id, size of a
stored result or empty, exit reason or empty, last since it is free text), then the body: the result
envelope's bytes as stored, with no base64 and no JSON around them. A heartbeat is a frame with neither,
a gateway that stops sends a SHUTDOWN frame whose meta is its message.
"""

from __future__ import annotations

import struct

from .errors import Unavailable

MEDIA_TYPE = "application/x-opbox-frames"
HEAD = struct.Struct(">BII")  # kind, meta length, body length (an exit reason is free text: no 64 KiB cap)
RESULT, STORED, EXPIRED, HEARTBEAT, SHUTDOWN = range(5)  # STORED: read it from its run; EXPIRED: gone (retention)


def result_frame(kind: int, index: int, seq: int, status: str, run_id: str, exit_reason: str | None,
                 size: int | None = None, body: bytes = b"") -> bytes:
    meta = f"{index}\t{seq}\t{status}\t{run_id}\t{'' if size is None else size}\t{exit_reason or ''}".encode()
    return HEAD.pack(kind, len(meta), len(body)) + meta + body


def frame(kind: int, meta: str = "") -> bytes:
    raw = meta.encode()
    return HEAD.pack(kind, len(raw), 0) + raw


class FrameReader:
    """Frames from a byte stream read in pieces of any size: ``feed`` a piece, get the lines it completes, in
    the shape of the NDJSON stream's (a result's ``payload`` is its envelope's bytes)."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, chunk: bytes) -> list[dict]:
        buf = self.buf
        buf += chunk
        lines, pos, head = [], 0, HEAD.size
        while len(buf) - pos >= head:
            kind, meta_len, body_len = HEAD.unpack_from(buf, pos)
            end = pos + head + meta_len + body_len
            if len(buf) < end:
                break
            meta = buf[pos + head:pos + head + meta_len].decode()
            if kind <= EXPIRED:
                index, seq, status, run_id, size, reason = meta.split("\t", 5)
                line = {"index": int(index), "run_id": run_id, "status": status, "seq": int(seq),
                        "exit_reason": reason or None}
                if kind == RESULT:
                    line["payload"] = bytes(buf[end - body_len:end])
                elif kind == STORED:
                    line["stored"], line["size"] = True, int(size)
                else:
                    line["expired"] = True
            elif kind == HEARTBEAT:
                line = {"heartbeat": True}
            elif kind == SHUTDOWN:
                line = {"shutdown": True, "message": meta}
            else:
                raise ValueError(f"unknown frame kind {kind} in a results stream")
            lines.append(line)
            pos = end
        del buf[:pos]
        return lines

    def finish(self) -> None:
        """The stream ended: a frame cut short is an error (the connection broke mid-frame)."""
        if self.buf:
            raise Unavailable(f"a results stream ended in the middle of a frame ({len(self.buf)} bytes left)")
