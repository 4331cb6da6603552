"""Chat: messages rendered into a prompt by the model's own template, and tool calls read back.

One rendering for every engine: the model's Jinja chat template (from its tokenizer config,
or the ``tokenizer.chat_template`` of its GGUF) rendered with the rules Hugging Face's
``apply_chat_template`` uses (a sandboxed environment, ``trim_blocks`` and ``lstrip_blocks``,
loop controls, ``tojson`` that does not escape HTML, ``raise_exception``, ``strftime_now``),
so the same messages give the same prompt, and the same token ids, on every engine. Tools
reach the template in the OpenAI shape templates expect (``{"type": "function", "function":
{"name", "description", "parameters"}}``), and assistant tool calls with their arguments as
objects.

Tool calls come back from Llama 3.1 as JSON text, ``{"name": ..., "parameters": {...}}``
(several separated by ``;``), optionally after ``<|python_tag|>``; ``parse_tool_calls`` reads
them, and only when every call names a given tool and carries an object of arguments.
"""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from llmgrpc.clients.errors import InvalidArgument, Reason

# Roles a message may have; "ipython" is Llama 3.1's own name for a tool result.
ROLES = ("system", "user", "assistant", "tool", "ipython")
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolCall:
    """A call the model made (or an earlier assistant turn made): arguments as JSON text."""

    name: str
    arguments: str
    id: str = ""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""

    def for_template(self) -> dict:
        message: dict = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": json.loads(call.arguments or "{}")},
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.name:
            message["name"] = self.name
        return message


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: str = ""  # a JSON Schema, as text

    def for_template(self) -> dict:
        function = {"name": self.name, "description": self.description}
        if self.parameters:
            function["parameters"] = json.loads(self.parameters)
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class Chat:
    """A conversation to continue, and the tools the model may call."""

    messages: tuple[ChatMessage, ...]
    tools: tuple[Tool, ...] = ()
    tool_choice: str = ""  # "auto" (the default with tools), "none", "required" or a tool's name
    add_generation_prompt: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def effective_tool_choice(self) -> str:
        return self.tool_choice or ("auto" if self.tools else "none")

    @property
    def forces_a_call(self) -> bool:
        return bool(self.tools) and self.effective_tool_choice not in ("auto", "none")

    @classmethod
    def from_pb(cls, pb) -> Chat:
        """The conversation of a GenerateRequest (llmgrpc.v1) with messages."""
        return cls(
            messages=tuple(
                ChatMessage(
                    role=message.role,
                    content=message.content,
                    tool_calls=tuple(
                        ToolCall(call.name, call.arguments, call.id) for call in message.tool_calls
                    ),
                    tool_call_id=message.tool_call_id,
                    name=message.name,
                )
                for message in pb.messages
            ),
            tools=tuple(Tool(tool.name, tool.description, tool.parameters) for tool in pb.tools),
            tool_choice=pb.tool_choice,
            add_generation_prompt=pb.add_generation_prompt if pb.HasField("add_generation_prompt") else True,
        )


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """The template compiled in an environment with Hugging Face's rules (cached per template)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment.from_string(template)


def render(template: str, chat: Chat, special_tokens: dict[str, str]) -> str:
    """The prompt text of chat under template; special_tokens: bos_token, eos_token, ... as text.

    A template that refuses the conversation (raise_exception, or an error while rendering) is
    the caller's INVALID_ARGUMENT, with the template's own message.
    """
    import jinja2

    if not template:
        raise InvalidArgument(
            "this model has no chat template, so it cannot take messages: send prompt instead",
            reason=Reason.INVALID_FIELD,
        )
    tools = [tool.for_template() for tool in chat.tools] or None
    try:
        return _compiled(template).render(
            messages=[message.for_template() for message in chat.messages],
            tools=tools,
            add_generation_prompt=chat.add_generation_prompt,
            **special_tokens,
            **chat.extra,
        )
    except jinja2.exceptions.TemplateError as error:
        raise InvalidArgument(
            f"the model's chat template refused these messages: {error}", reason=Reason.INVALID_FIELD
        ) from None


def hugging_face_chat_ids(tokenizer, chat: Chat) -> list[int]:
    """A conversation's prompt ids with a Hugging Face tokenizer: its chat template rendered, then
    tokenized as written (the template writes the beginning-of-text token itself)."""
    specials = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    text = render(tokenizer.chat_template or "", chat, specials)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def parse_tool_calls(text: str, tools: tuple[Tool, ...]) -> list[ToolCall]:
    """The tool calls in a Llama 3.1 answer, or [] when it is not (only) tool calls."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG) :].strip()
    if not body.startswith("{"):
        return []
    names = {tool.name for tool in tools}
    calls = []
    decoder = json.JSONDecoder()
    position = 0
    while position < len(body):
        try:
            value, end = decoder.raw_decode(body, position)
        except json.JSONDecodeError:
            return []
        arguments = value.get("parameters", value.get("arguments")) if isinstance(value, dict) else None
        if not isinstance(value, dict) or value.get("name") not in names or not isinstance(arguments, dict):
            return []
        calls.append(
            ToolCall(
                value["name"], json.dumps(arguments, ensure_ascii=False), f"call_{uuid.uuid4().hex[:24]}"
            )
        )
        position = end
        while position < len(body) and body[position] in " \t\r\n;":
            position += 1
    return calls


def tool_call_schema(tools: tuple[Tool, ...], tool_choice: str) -> dict:
    """A JSON Schema that only a valid call of the chosen tool(s) satisfies, in Llama 3.1's shape
    ({"name": ..., "parameters": {...}}): what forces a call for tool_choice "required" or a name."""
    chosen = [tool for tool in tools if tool_choice == "required" or tool.name == tool_choice]
    alternatives = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.name},
                "parameters": json.loads(tool.parameters) if tool.parameters else {"type": "object"},
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for tool in chosen
    ]
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


def attach_tool_calls(response, text: str, tools) -> None:
    """Mark the last GenerateResponse (llmgrpc.v1) of an answer whose whole text is tool calls of
    the given tools (GenerateRequest.tools): its tool_calls, and FINISH_REASON_TOOL_CALLS."""
    from llmgrpc.v1 import generate_pb2

    given = tuple(Tool(tool.name, tool.description, tool.parameters) for tool in tools)
    calls = parse_tool_calls(text, given)
    if calls:
        response.tool_calls.extend(
            generate_pb2.ToolCall(id=call.id, name=call.name, arguments=call.arguments) for call in calls
        )
        response.finish_reason = generate_pb2.FINISH_REASON_TOOL_CALLS
