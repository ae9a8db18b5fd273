#!/usr/bin/env python3
# An MCP tool server (stdio, Python standard library only) with two tools for Den's agents:
#   now        the current UTC time, ISO 8601 and unix seconds
#   calculate  an arithmetic expression: numbers, + - * / // % **, unary +/-, parentheses
# Den speaks newline-delimited JSON-RPC 2.0 on stdin/stdout; stderr is this server's log.
# With --connect PATH it dials in to a running daemon's tools.sock and speaks on that socket.
import ast
import json
import operator
import sys
import time
from datetime import datetime, timezone

TOOLS = [
    {
        "name": "now",
        "description": "The current UTC time as ISO 8601 and as unix seconds.",
        "inputSchema": {"type": "object", "properties": {}},
    },
    {
        "name": "calculate",
        "description": "Evaluates an arithmetic expression: numbers, + - * / // % **, parentheses.",
        "inputSchema": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. (2 + 3) * 7 / 2"}},
            "required": ["expression"],
        },
    },
]

BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate(node):
    """Walks the parsed expression; any node that is not plain arithmetic is refused."""
    if isinstance(node, ast.Expression):
        return evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 1000 or isinstance(left, int) and left.bit_length() * abs(right) > 100_000):
            raise ValueError("the power is too large")
        return BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](evaluate(node.operand))
    raise ValueError(f"not allowed in an arithmetic expression: {type(node).__name__}")


def call_tool(name, arguments):
    """Returns (text, is_error, structured or None)."""
    if name == "now":
        moment = datetime.now(timezone.utc)
        iso = moment.isoformat(timespec="seconds").replace("+00:00", "Z")
        unix = int(time.time())
        return f"{iso} (unix {unix})", False, {"utc": iso, "unix": unix}
    expression = arguments.get("expression")
    if not isinstance(expression, str) or len(expression) > 1000:
        return "expression must be a string of at most 1000 characters", True, None
    try:
        value = evaluate(ast.parse(expression, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
        return f"cannot evaluate {expression!r}: {e}", True, None
    return str(value), False, {"value": value}


def handle(request):
    """The reply to one request (None for notifications)."""
    method, params = request.get("method"), request.get("params") or {}
    if "id" not in request:
        return None  # notifications/initialized, notifications/cancelled: nothing to say
    if method == "initialize":
        result = {"protocolVersion": params.get("protocolVersion", "2025-06-18"),
                  "capabilities": {"tools": {}},
                  "serverInfo": {"name": "clock_calc", "version": "1.0"}}
    elif method == "ping":
        result = {}
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "tools/call" and params.get("name") in ("now", "calculate"):
        text, is_error, structured = call_tool(params["name"], params.get("arguments") or {})
        result = {"content": [{"type": "text", "text": text}], "isError": is_error}
        if structured is not None:
            result["structuredContent"] = structured
    elif method == "tools/call":
        return {"jsonrpc": "2.0", "id": request["id"],
                "error": {"code": -32602, "message": f"Unknown tool: {params.get('name')}"}}
    else:
        return {"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32601, "message": f"Method not found: {method}"}}
    return {"jsonrpc": "2.0", "id": request["id"], "result": result}


def serve(reader, writer):
    """Answers JSON-RPC lines from `reader` on `writer` until the other side closes."""
    for line in reader:
        try:
            request = json.loads(line)
        except ValueError:
            reply = {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}}
        else:
            reply = handle(request) if isinstance(request, dict) else None
        if reply is not None:
            writer.write(json.dumps(reply) + "\n")
            writer.flush()


def main():
    # --connect PATH: dial in to a running daemon's tools.sock instead of being spawned by it.
    if len(sys.argv) == 3 and sys.argv[1] == "--connect":
        import socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            try:
                connection.connect(sys.argv[2])
            except OSError as e:
                sys.exit(f"clock_calc: cannot connect to {sys.argv[2]}: {e.strerror}")
            print(f"clock_calc: connected to {sys.argv[2]}", file=sys.stderr, flush=True)
            serve(connection.makefile("r", encoding="utf-8"), connection.makefile("w", encoding="utf-8"))
        return
    if len(sys.argv) != 1:
        sys.exit("usage: clock_calc.py [--connect PATH-TO-tools.sock]")
    serve(sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
