#!/usr/bin/env python3
# An MCP tool server (stdio, Python standard library only) that lets Den's agents see the
# files under one directory, given as argv[1], and nothing outside it:
#   list  the entries of a directory (relative path, "." by default)
#   read  a text file, at most 64 KiB of it
# Absolute paths, ".." that climbs out and symlinks that lead out are refused.
import json
import os
import sys

MAX_READ_BYTES = 64 * 1024
ROOT = os.path.realpath(sys.argv[1]) if len(sys.argv) > 1 else None

TOOLS = [
    {
        "name": "list",
        "description": "Lists a directory: one line per entry, 'dir NAME', 'link NAME' or 'file NAME SIZE'.",
        "inputSchema": {"type": "object", "properties": {"path": {"type": "string", "description": "relative; default '.'"}}},
    },
    {
        "name": "read",
        "description": f"Reads a text file (at most {MAX_READ_BYTES} bytes).",
        "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
    },
]


def resolve(path):
    """The real path of `path` under ROOT; ValueError when it would leave ROOT."""
    if not isinstance(path, str) or os.path.isabs(path):
        raise ValueError(f"path must be relative to the shared directory: {path!r}")
    full = os.path.realpath(os.path.join(ROOT, path))  # follows symlinks and folds ".."
    if os.path.commonpath([ROOT, full]) != ROOT:
        raise ValueError(f"path leaves the shared directory: {path!r}")
    return full


def list_dir(arguments):
    full = resolve(arguments.get("path", "."))
    lines = []
    for entry in sorted(os.scandir(full), key=lambda e: e.name):
        if entry.is_symlink():  # not followed: it may point outside
            lines.append(f"link {entry.name}")
        elif entry.is_dir():
            lines.append(f"dir {entry.name}")
        else:
            lines.append(f"file {entry.name} {entry.stat().st_size}")
    return "\n".join(lines)


def read_file(arguments):
    with open(resolve(arguments.get("path")), "rb") as f:
        data = f.read(MAX_READ_BYTES + 1)
    text = data[:MAX_READ_BYTES].decode("utf-8", errors="replace")
    return text + (f"\n[truncated at {MAX_READ_BYTES} bytes]" if len(data) > MAX_READ_BYTES else "")


def handle(request):
    """The reply to one request (None for notifications)."""
    method, params = request.get("method"), request.get("params") or {}
    if "id" not in request:
        return None
    if method == "initialize":
        result = {"protocolVersion": params.get("protocolVersion", "2025-06-18"),
                  "capabilities": {"tools": {}},
                  "serverInfo": {"name": "files", "version": "1.0"}}
    elif method == "ping":
        result = {}
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "tools/call" and params.get("name") in ("list", "read"):
        tool = list_dir if params["name"] == "list" else read_file
        try:
            result = {"content": [{"type": "text", "text": tool(params.get("arguments") or {})}], "isError": False}
        except (OSError, ValueError) as e:
            result = {"content": [{"type": "text", "text": str(e)}], "isError": True}
    elif method == "tools/call":
        return {"jsonrpc": "2.0", "id": request["id"],
                "error": {"code": -32602, "message": f"Unknown tool: {params.get('name')}"}}
    else:
        return {"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32601, "message": f"Method not found: {method}"}}
    return {"jsonrpc": "2.0", "id": request["id"], "result": result}


def main():
    if ROOT is None or not os.path.isdir(ROOT):
        sys.exit("usage: files.py DIRECTORY (an existing directory to share)")
    for line in sys.stdin:
        try:
            request = json.loads(line)
        except ValueError:
            reply = {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}}
        else:
            reply = handle(request) if isinstance(request, dict) else None
        if reply is not None:
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
