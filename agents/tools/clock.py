#!/usr/bin/env python3
# A minimal MCP tool server (stdio, newline-delimited JSON-RPC) for the example agents: a clock
# and a calculator. The daemon spawns it when its config lists it (agents/README.md, "Tools"):
#   tools:
#     - name: clock
#       command: [python3, /path/to/den/agents/tools/clock.py]
# Agents then see `clock.now` and `clock.calc`.
import ast
import datetime
import json
import operator
import sys

TOOLS = [
    {"name": "now", "description": "The current date and time (UTC, ISO 8601).",
     "inputSchema": {"type": "object", "properties": {}}},
    {"name": "calc", "description": "Evaluates an arithmetic expression, e.g. \"(2 + 3) * 4 / 7\".",
     "inputSchema": {"type": "object", "properties": {"expression": {"type": "string"}},
                     "required": ["expression"]}},
]

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv,
             ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate(node):
    # Numbers and + - * / ** % // only: no names, calls or attributes.
    if isinstance(node, ast.Expression):
        return evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 1000:
            raise ValueError("exponent too large")
        return OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](evaluate(node.operand))
    raise ValueError("only numbers and + - * / ** % // are allowed")


def call(name, arguments):
    if name == "now":
        text = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"content": [{"type": "text", "text": text}], "isError": False}
    if name == "calc":
        try:
            value = evaluate(ast.parse(str(arguments.get("expression", "")), mode="eval"))
            return {"content": [{"type": "text", "text": str(value)}], "isError": False}
        except Exception as e:  # the model's expression: report, do not fail the call
            return {"content": [{"type": "text", "text": f"cannot evaluate: {e}"}], "isError": True}
    return None


def main():
    for line in sys.stdin:
        try:
            request = json.loads(line)
        except ValueError:
            continue
        if "id" not in request:
            continue  # a notification
        method, params = request.get("method"), request.get("params") or {}
        response = {"jsonrpc": "2.0", "id": request["id"]}
        if method == "initialize":
            response["result"] = {"protocolVersion": params.get("protocolVersion", "2025-06-18"),
                                  "capabilities": {"tools": {}},
                                  "serverInfo": {"name": "den-example-clock", "version": "1"}}
        elif method == "tools/list":
            response["result"] = {"tools": TOOLS}
        elif method == "tools/call":
            result = call(params.get("name"), params.get("arguments") or {})
            if result is None:
                response["error"] = {"code": -32602, "message": f"unknown tool: {params.get('name')}"}
            else:
                response["result"] = result
        elif method == "ping":
            response["result"] = {}
        else:
            response["error"] = {"code": -32601, "message": f"method not found: {method}"}
        sys.stdout.write(json.dumps(response) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
