"""How the gateway joins a service's OpenAPI document into the public one."""

from typing import Any

from services.gateway.openapi import add_links, merge_service


def _doc(schema: dict[str, Any], path: str) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/Page"}
    op = {"responses": {"200": {"content": {"application/json": {"schema": ref}}}, "422": {}}}
    return {"paths": {path: {"get": op}}, "components": {"schemas": {"Page": schema}}}


def test_a_clashing_schema_is_renamed_and_every_reference_follows() -> None:
    public: dict[str, Any] = {"paths": {}, "components": {"schemas": {}}}
    files = {"type": "object", "properties": {"data": {"type": "array"}}}
    jobs = {"type": "object", "properties": {"jobs": {"type": "array"}}}
    merge_service(public, "retrieval", _doc(files, "/v1/files"))
    merge_service(public, "finetune", _doc(jobs, "/v1/fine_tuning/jobs"))
    merge_service(public, "agent", _doc(files, "/v1/agent/runs"))  # same shape: shared
    schemas = public["components"]["schemas"]
    assert schemas == {"Page": files, "finetune_Page": jobs}

    def ref(path: str) -> str:
        schema = public["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
        return str(schema["schema"]["$ref"])

    assert ref("/v1/fine_tuning/jobs") == "#/components/schemas/finetune_Page"
    assert ref("/v1/files") == ref("/v1/agent/runs") == "#/components/schemas/Page"
    op = public["paths"]["/v1/files"]["get"]
    assert "422" not in op["responses"] and {"401", "429", "503"} <= set(op["responses"])


def test_only_the_routes_the_gateway_forwards_to_that_service_are_taken() -> None:
    public: dict[str, Any] = {"paths": {}, "components": {"schemas": {}}}
    part = _doc({"type": "object"}, "/v1/files")
    part["paths"]["/internal/adapters"] = part["paths"]["/v1/files"]
    part["paths"]["/v1/agent/runs"] = part["paths"]["/v1/files"]  # the agent's, not retrieval's
    merge_service(public, "retrieval", part)
    assert set(public["paths"]) == {"/v1/files"}


def test_a_create_links_to_the_routes_of_what_it_made() -> None:
    def op(name: str) -> dict[str, Any]:
        return {"operationId": name, "responses": {"200": {}}}

    doc: dict[str, Any] = {
        "paths": {
            "/v1/vector_stores": {"post": op("create")},
            "/v1/vector_stores/{store_id}": {"get": op("get"), "delete": op("delete")},
            "/v1/vector_stores/{store_id}/files": {"post": op("add")},
            "/v1/vector_stores/{store_id}/files/{file_id}": {"get": op("get_file")},
        }
    }
    add_links(doc)
    made = doc["paths"]["/v1/vector_stores"]["post"]["responses"]["200"]["links"]
    assert {link["operationId"] for link in made.values()} == {"get", "delete", "add"}
    assert made["get_get"]["parameters"] == {"store_id": "$response.body#/id"}
    added = doc["paths"]["/v1/vector_stores/{store_id}/files"]["post"]["responses"]["200"]["links"]
    assert list(added.values()) == [
        {
            "operationId": "get_file",
            "parameters": {"store_id": "$request.path.store_id", "file_id": "$response.body#/id"},
        }
    ]
