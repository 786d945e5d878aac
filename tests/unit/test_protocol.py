import pytest

from router.errors import BadRequest, NotFound
from router.protocol import ChatCompletionRequest, CompletionRequest, parse


def test_valid_bodies() -> None:
    c = parse(CompletionRequest, {"model": "m", "prompt": "hi", "max_tokens": 5, "stop": "x"})
    assert c.stop_list() == ("x",) and c.single_prompt() == "hi"
    ch = parse(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "q"}],
                                       "max_completion_tokens": 3, "logprobs": True, "top_logprobs": 2})
    assert ch.effective_max_tokens() == 3 and ch.num_logprobs() == 2


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi"}, "model"),
    ({"model": "m", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ({"model": "m", "prompt": "hi", "temperature": 5}, "temperature"),
    ({"model": "m", "prompt": "hi", "n": 2}, "n"),
    ({"model": "m", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "prompt": {"a": 1}}, "prompt"),
])
def test_invalid_completion_bodies_name_the_field(body: dict, param: str) -> None:
    with pytest.raises(BadRequest) as e:
        parse(CompletionRequest, body)
    assert e.value.param is not None and e.value.param.startswith(param)
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_non_object_body_and_multi_prompt() -> None:
    with pytest.raises(BadRequest):
        parse(CompletionRequest, [1, 2])
    with pytest.raises(BadRequest):
        parse(CompletionRequest, {"model": "m", "prompt": ["a", "b"]}).single_prompt()
    with pytest.raises(BadRequest):
        parse(ChatCompletionRequest, {"model": "m", "messages": []})


def test_error_shapes() -> None:
    e = NotFound("no such model", param="model", code="model_not_found")
    assert e.status == 404
    assert e.body() == {"error": {"message": "no such model", "type": "not_found_error",
                                  "param": "model", "code": "model_not_found"}}
