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
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

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


def render(
    template: str,
    chat: Chat,
    special_tokens: dict[str, str],
    protect: Callable[[Any], Any] = lambda value: value,
) -> str:
    """The prompt text of chat under template; special_tokens: bos_token, eos_token, ... as text;
    protect: applied to each message and tool as the template receives them.

    A template that refuses the conversation (raise_exception, or an error while rendering) is
    the caller's INVALID_ARGUMENT, with the template's own message.
    """
    import jinja2

    if not template:
        raise InvalidArgument(
            "this model has no chat template, so it cannot take messages: send prompt instead",
            reason=Reason.INVALID_FIELD,
        )
    tools = [protect(tool.for_template()) for tool in chat.tools] or None
    try:
        return _compiled(template).render(
            messages=[protect(message.for_template()) for message in chat.messages],
            tools=tools,
            add_generation_prompt=chat.add_generation_prompt,
            **special_tokens,
            **chat.extra,
        )
    except jinja2.exceptions.TemplateError as error:
        raise InvalidArgument(
            f"the model's chat template refused these messages: {error}", reason=Reason.INVALID_FIELD
        ) from None


# Private-use characters around a placeholder's number (see chat_prompt_ids).
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def chat_prompt_ids(
    template: str,
    chat: Chat,
    special_tokens: dict[str, str],
    control_ids: Mapping[str, int],
    tokenize_text: Callable[[list[str]], list[list[int]]],
) -> list[int]:
    """A conversation's prompt ids: the template rendered, its own control tokens as their ids
    (control_ids: each control token's spelling), everything else as text (tokenize_text, which
    reads no special tokens, tokenizes a list of texts).

    What callers wrote (contents, tool results, arguments, names, descriptions) is text even
    where it spells a control token: while the template renders, each such spelling is a
    placeholder of private-use characters (and so is any such character of theirs); the rendered
    prompt is cut at the control tokens left, which are the template's own, and each piece
    between them gets the callers' spellings back and is tokenized as text. Tokenizers cut text
    at special tokens the same way, so a conversation without such spellings gets the ids it
    always had (apply_chat_template's).
    """
    control = sorted(filter(None, control_ids), key=len, reverse=True)  # the longest wins, as in tokenizers
    caller_specials = re.compile("|".join([*map(re.escape, control), f"[{_OPEN}{_CLOSE}]"]))
    originals: list[str] = []

    def placeholder(match: re.Match) -> str:
        originals.append(match.group())
        return f"{_OPEN}{len(originals) - 1}{_CLOSE}"

    def protect(value: Any) -> Any:
        if isinstance(value, str):
            return caller_specials.sub(placeholder, value)
        if isinstance(value, dict):
            return {protect(key): protect(item) for key, item in value.items()}
        if isinstance(value, list):
            return [protect(item) for item in value]
        return value

    text = render(template, chat, special_tokens, protect)
    pieces = re.split(f"({'|'.join(map(re.escape, control))})", text) if control else [text]
    # re.split with one group: text, control token, text, ..., text.
    texts = [_PLACEHOLDER.sub(lambda match: originals[int(match.group(1))], piece) for piece in pieces[::2]]
    tokenized = iter(tokenize_text(texts))
    ids: list[int] = []
    for index, piece in enumerate(pieces):
        ids += next(tokenized) if index % 2 == 0 else [control_ids[piece]]
    return ids


def hugging_face_chat_ids(tokenizer, chat: Chat) -> list[int]:
    """A conversation's prompt ids with a Hugging Face tokenizer (see chat_prompt_ids; the template
    writes the beginning-of-text token itself)."""
    specials = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    control_ids = {
        token.content: token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
    }

    def tokenize_text(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True).input_ids

    return chat_prompt_ids(tokenizer.chat_template or "", chat, specials, control_ids, tokenize_text)


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
        except (json.JSONDecodeError, RecursionError):  # a model can write "[[[[..." too
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
