---@meta
-- LuaLS annotations of the API Den gives agent scripts (agents/README.md explains it). Point
-- your editor's Lua language server at this folder ("workspace.library") to get completion
-- and type checks. This file is documentation only: the daemon never loads it.

---@alias JsonValue nil|boolean|integer|number|string|table  # plain values only: no functions, userdata, cycles, NaN

---An agent script returns one table of handlers; each is optional.
---@class Handlers
---@field on_start? fun(ctx: Ctx)                        # once, right after `den agent spawn`
---@field on_message? fun(ctx: Ctx, msg: Message)        # for every message, in order
---@field on_timer? fun(ctx: Ctx, payload: JsonValue)    # for every timer set with ctx:schedule
---@field on_context_full? fun(ctx: Ctx)                 # when the idle agent's conversation fills 3/4 of the context

---A message to the agent, from a client (`den agent send`, `agents/send`) or another agent (`ctx:send`).
---@class Message
---@field id integer           # its id: what ctx:reply answers
---@field from string          # "client", or "agent:<name>" for a message sent with ctx:send
---@field body JsonValue       # the message as sent: a string for `den agent send`, any plain value from ctx:send
---@field text? string         # body when it is a string, or body.text when body is a table with a `text`

---What session:generate returns besides the text.
---@class GenerateInfo
---@field text string          # the generated text (the first return value)
---@field finish_reason "length"|"end_of_generation"|"stop_string"|"context_full"|"cancelled"|"failed"
---@field tokens integer       # tokens generated
---@field tokens_used integer  # tokens the call added to the session (prompt tokens included); counts against the budget
---@field error? string        # why, when finish_reason is "failed"

---@class GenerateOptions
---@field max_tokens? integer  # default 256
---@field temperature? number  # default 0.7; 0 is greedy
---@field top_k? integer       # default 40; 0: off
---@field top_p? number        # default 0.95; 1: off
---@field seed? integer        # default: derived from the run and the call, so a replay draws the same tokens
---@field stop? string[]       # stop strings (the text ends before them)
---@field raw? boolean         # default false; true: continue the text as it is, without opening and closing an assistant turn
---@field stream? boolean      # default true: subscribers (`den agent attach`, `den agent send` on a terminal) see the text as it comes

---@class ChatTurn
---@field role string          # "system", "user", "assistant", "tool", ...
---@field content string

---The agent's conversation: a daemon session (token history and KV cache) that only it writes.
---@class Session
---@field id string            # the daemon's id of the session, "s-<n>" (`den sessions show s-<n>`)
local Session = {}

---Appends one chat turn, rendered with the model's chat template. Journaled.
---@param role string|ChatTurn   # "system", "user", "tool", ... or a {role=, content=} table
---@param content? string        # the turn's text (with a role string)
function Session:append(role, content) end

---Generates an assistant turn (the template's assistant prompt first, its end-of-turn after)
---and keeps it in the conversation. Waits for the engine (the handler yields meanwhile).
---Journaled: after a restart a finished generation returns its recorded text.
---Raises an error when the agent's token budget is exhausted.
---@param options? GenerateOptions
---@return string text
---@return GenerateInfo info
function Session:generate(options) end

---The conversation's length in tokens.
---@return integer tokens
function Session:length() end

---Copies the conversation (history and KV, shared copy-on-write) into a new daemon session.
---The agent goes on in its own; the copy is an ordinary session (`den sessions ls`). Journaled.
---@param name? string  # the copy's name (default: none)
---@return string id     # the copy's id, "s-<n>"
function Session:fork(name) end

---Keeps the conversation's KV in the fastest tier (never evicted) until unpin.
function Session:pin() end

---Lets the conversation's KV be evicted again.
function Session:unpin() end

---Writes the conversation's history and KV to durable storage (waits until done).
---@return true|nil ok
---@return string? error
function Session:checkpoint() end

---What every handler receives.
---@class Ctx
---@field name string          # the agent's name
---@field state table          # durable state: plain values; committed when the handler returns, untouched when it fails
---@field session Session      # the agent's conversation
local Ctx = {}

---Sends a message to another agent (it must exist): queued durably, handled by its on_message
---with msg.from == "agent:<this agent's name>". Journaled (a replay does not send twice).
---@param agent string
---@param message JsonValue
---@return integer message_id
function Ctx:send(agent, message) end

---Answers a message: the reply goes to the client waiting for it (`den agent send`) and to
---subscribers. Another agent does not receive replies: answer it with ctx:send. Journaled.
---@param msg Message
---@param text string
function Ctx:reply(msg, text) end

---Waits `seconds` (0 to one year); durable: after a restart the wait ends when it would have.
---The agent handles nothing else meanwhile: for long waits prefer ctx:schedule.
---@param seconds number
function Ctx:sleep(seconds) end

---Sets a durable timer: on_timer(ctx, payload) runs when it falls due (also after restarts;
---one that fell due while the daemon was down fires when it starts). Journaled.
---@param when number|{at: number}  # seconds from now, or {at = unix seconds}
---@param payload? JsonValue
---@return integer timer_id
function Ctx:schedule(when, payload) end

---One line in the agent's log (`den agent logs`): the arguments, tostring'ed, space-separated.
---Also callable as ctx.log(...). A replayed handler does not log again the lines it logged
---before its last recorded effect.
---@param ... any
function Ctx:log(...) end

---@class ToolInfo
---@field name string          # "<server>.<tool>": what den.tools.call takes
---@field description string
---@field input_schema table   # the JSON Schema of its arguments, as the server gave it

---@class ToolResult
---@field text string          # the text items of `content`, joined with newlines
---@field content table[]      # the MCP content items ({type = "text", text = ...}, ...)
---@field is_error boolean     # the tool itself reports an error

---@class ToolCallRequest
---@field name string
---@field arguments table

---@class DenTools
local DenTools = {}

---The tools of the daemon's MCP servers (its config's `tools` list); empty without any.
---Not journaled: it reflects the servers as they are now.
---@return ToolInfo[]
function DenTools.list() end

---Calls a tool and waits for its result (timeout: the config's limits.tool_seconds, 30 s by default). Journaled: a replay returns the
---recorded result without calling again.
---@param name string          # "<server>.<tool>"
---@param arguments? table     # the tool's arguments (an object)
---@return ToolResult|nil result
---@return string? error       # unknown tool, bad arguments, timeout, the server failed or hung up
function DenTools.call(name, arguments) end

---The global `den`.
---@class Den
---@field tools DenTools
den = {}

---The time, in unix seconds (with a fraction). Journaled: a replay returns the recorded
---time. Use it instead of a clock of your own (there is no `os`).
---@return number
function den.now() end

---The tool calls in a model's output, in order: Hermes/ChatML
---`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (a missing closing tag is fine)
---or Llama 3's bare `{"name": ..., "parameters": {...}}`. Malformed calls are skipped.
---@param text string
---@return ToolCallRequest[]
function den.parse_tool_calls(text) end
