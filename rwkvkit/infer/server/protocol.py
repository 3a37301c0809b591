"""The HTTP API's request and response schemas (pydantic) and :class:`ApiError`, the error it answers in
OpenAI's shape. Schemas check types and ranges; what needs the model (token ids, limits) is checked in
:mod:`.serving`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """An error answered with ``status`` in OpenAI's shape (see :func:`.errors.error_body`)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.headers = headers


Temperature = Annotated[StrictFloat, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[StrictFloat, Field(gt=0, le=1, allow_inf_nan=False)]
Fraction = Annotated[StrictFloat, Field(ge=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[StrictFloat, Field(ge=-2, le=2, allow_inf_nan=False)]
Bias = Annotated[StrictFloat, Field(ge=-100, le=100, allow_inf_nan=False)]
Count = Annotated[StrictInt, Field(ge=0)]
Seed = Annotated[StrictInt, Field(ge=-(2**63), lt=2**64)]  # what torch.Generator.manual_seed accepts
TokenIds = list[StrictInt]
TopLogprobs = Annotated[StrictInt, Field(ge=0, le=20)]


class RequestBody(BaseModel):
    """Base of the request bodies: fields this server does not know are ignored (clients send newer
    OpenAI fields)."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(RequestBody):
    include_usage: StrictBool = False


class SamplingRequest(RequestBody):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: StrictStr
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Count | None = Field(None, description="rwkvkit extra: keep the K most likely tokens (0 = all)")
    min_p: Fraction | None = Field(None, description="rwkvkit extra: min-p filtering")
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    penalty_decay: Fraction | None = Field(
        None, description="rwkvkit extra: the penalty counts decay by this factor every token (0.996)"
    )
    logit_bias: dict[str, Bias] | None = Field(None, description="token id (as a string) -> bias")
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Seed | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = Field(
        1, description="choices per prompt, 1 to 16 (and at most --max-batch); the prompt is read once"
    )
    user: StrictStr | None = Field(None, description="ignored")
    state: StrictStr | None = Field(
        None, description="rwkvkit extra: a state file in --state-dir to start from"
    )
    save_state: StrictStr | None = Field(
        None, description="rwkvkit extra: a state file in --state-dir to write the final state to"
    )


class CompletionRequest(SamplingRequest):
    prompt: StrictStr | TokenIds | list[StrictStr] | list[TokenIds] = Field(
        description="a string, a list of token ids, or a batch (list) of either"
    )
    max_tokens: Count | None = None
    logprobs: TopLogprobs | None = Field(
        None, description="0-20: each token's log-probability and this many most likely alternatives"
    )
    echo: StrictBool | None = Field(False, description="the prompt comes back before the completion")
    best_of: StrictInt | None = Field(None, description="only 1 is supported")
    suffix: StrictStr | None = Field(None, description="not supported")


class ContentPart(RequestBody):
    type: StrictStr
    text: StrictStr | None = None


FunctionName = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class CalledFunction(RequestBody):
    name: StrictStr
    arguments: StrictStr = Field(description="the arguments as a JSON string")


class ToolCall(RequestBody):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = Field(None, description="ignored")
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant message's calls")
    tool_call_id: StrictStr | None = Field(None, description="a tool message: the call it answers")


class FunctionDef(RequestBody):
    name: FunctionName
    description: StrictStr | None = None
    parameters: dict | None = Field(None, description="a JSON schema (an object's)")
    strict: StrictBool | None = None


class ToolDef(RequestBody):
    type: StrictStr = "function"
    function: FunctionDef | None = None


class NamedFunction(RequestBody):
    name: StrictStr


class NamedToolChoice(RequestBody):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(RequestBody):
    name: StrictStr = "response"
    description: StrictStr | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    logprobs: StrictBool | None = Field(False, description="each generated token's log-probability")
    tools: list[ToolDef] | None = None
    tool_choice: StrictStr | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = True
    response_format: ResponseFormat | None = None
    top_logprobs: TopLogprobs | None = Field(
        None, description="0-20 most likely alternatives (needs logprobs)"
    )


class EmbeddingRequest(RequestBody):
    model: StrictStr
    input: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: StrictInt | None = Field(None, description="must be n_embd when given")
    user: StrictStr | None = Field(None, description="ignored")


class TokenizeRequest(RequestBody):
    """``POST /tokenize``: a ``prompt`` (completion form) or ``messages`` (chat form), one of the two."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: StrictBool = Field(True, description="accepted; RWKV adds no special tokens")
    add_generation_prompt: StrictBool = Field(
        True, description="chat form: end with the assistant's turn opening (Assistant:)"
    )
    return_token_strs: StrictBool = Field(False, description="also return each token as a string")


class DetokenizeRequest(RequestBody):
    """``POST /detokenize``: token ids back to text."""

    model: StrictStr | None = None
    tokens: TokenIds


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def documented_errors(*statuses: int) -> dict:
    """The ``responses`` of a route: these error statuses, documented with the ErrorResponse schema."""
    return {status: {"model": ErrorResponse} for status in statuses}
