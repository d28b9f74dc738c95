"""The schema's description of /v1/ (apps/inference/openapi.py) keeps to what the parser
honours: a field it accepts is documented, and a documented field is accepted."""

from __future__ import annotations

from apps.inference import openai_api, openapi


def test_the_request_bodies_list_the_fields_the_parser_honours():
    assert set(openapi.CHAT_REQUEST["properties"]) == openai_api.CHAT_FIELDS
    assert set(openapi.COMPLETION_REQUEST["properties"]) == openai_api.COMPLETION_FIELDS
    # Any other field is refused by name, as the schema says.
    assert openapi.CHAT_REQUEST["additionalProperties"] is False
    assert openapi.COMPLETION_REQUEST["additionalProperties"] is False


def test_every_operation_answers_errors_in_openais_shape():
    for path, item in openapi.PATHS.items():
        for operation in item.values():
            assert operation["security"] == [{"apiKey": []}], path
            for code, response in operation["responses"].items():
                if code != "200":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/OpenAIError"}, (path, code)
