"""The school API's OpenAPI 3.1 document, generated from the resource catalogue.

Paths, schemas, required scopes and event names all come from `resources/`, so the document
describes exactly what the service does. Scopes are written as OAuth 2.0 security
requirements (the gateway checks the token; the service checks the scopes again) and, where
any one of several scopes will do, as one alternative requirement each.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from libs.common.scopes import CATALOGUE as SCOPES
from services.school_api.resources import BY_NAME, CATALOGUE, COLLECTIONS, event_scopes
from services.school_api.resources.model import Change, Field, Resource
from services.school_api.validation import DEFAULT_LIMIT, MAX_LIMIT

_ERROR = {"$ref": "#/components/schemas/Error"}
_TYPES: dict[str, dict[str, Any]] = {
    "string": {"type": "string"},
    "text": {"type": "string"},
    "integer": {"type": "integer"},
    "number": {"type": "number"},
    "boolean": {"type": "boolean"},
    "timestamp": {"type": "string", "format": "date-time"},
    "reference": {"type": "integer", "format": "int64"},
    "object": {"type": "object", "additionalProperties": {"type": "integer"}},
}
_FORMATS = {"email": "email", "url": "uri"}


def _field_schema(f: Field, *, for_input: bool) -> dict[str, Any]:
    schema: dict[str, Any] = {"enum": list(f.choices)} if f.kind == "enum" else dict(_TYPES[f.kind])
    if f.fmt in _FORMATS:
        schema["format"] = _FORMATS[f.fmt]
    if f.description:
        schema["description"] = f.description
    if for_input:
        if f.min_length:
            schema["minLength"] = f.min_length
        if f.max_length is not None:
            schema["maxLength"] = f.max_length
        if f.minimum is not None:
            schema["minimum"] = f.minimum
        if f.maximum is not None:
            schema["maximum"] = f.maximum
        if f.write_scopes:
            schema["x-required-scopes"] = list(f.write_scopes)
    else:
        if not f.writable:
            schema["readOnly"] = True
        if f.references:
            schema["x-references"] = f.references
    if f.nullable:
        schema = {"oneOf": [schema, {"type": "null"}]}
    return schema


def _schema_name(resource: Resource) -> str:
    return "".join(part.capitalize() for part in resource.singular.split("_"))


def _row_schema(resource: Resource) -> dict[str, Any]:
    id_schema = (
        {"type": "string", "format": "uuid"}
        if resource.kind == "upload"
        else {
            "type": "integer",
            "format": "int64",
        }
    )
    properties: dict[str, Any] = {
        "id": {**id_schema, "readOnly": True},
        "school_id": {"type": "integer", "format": "int64", "readOnly": True},
    }
    for f in resource.fields:
        properties[f.name] = _field_schema(f, for_input=False)
    return {
        "type": "object",
        "description": resource.summary,
        "required": list(resource.columns),
        "properties": properties,
    }


def _input_schema(resource: Resource, *, creating: bool) -> dict[str, Any]:
    parent_field = resource.parent.field if resource.parent else None
    fields = [
        f
        for f in resource.fields
        if f.writable and f.name != parent_field and (creating or f.updatable)
    ]
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {f.name: _field_schema(f, for_input=True) for f in fields},
    }
    required = [f.name for f in fields if creating and f.required]
    if required:
        schema["required"] = required
    if not creating:
        schema["minProperties"] = 1
    return schema


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _security(scopes: tuple[str, ...]) -> list[dict[str, list[str]]]:
    return [{"oauth2": [scope]} for scope in scopes]


def _errors(*codes: str) -> dict[str, Any]:
    words = {
        "400": "Not a JSON body",
        "401": "No identity from the gateway",
        "403": "insufficient_scope, naming the scopes that would do",
        "404": "No such row in this school",
        "409": "conflict: a unique field's value is taken",
        "413": "payload_too_large: the body is over the service's limit",
        "422": "validation_failed, with a code per field",
    }
    return {code: _json(_ERROR, words[code]) for code in codes}


def _list_parameters(resource: Resource) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {
            "name": "limit",
            "in": "query",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_LIMIT,
                "default": DEFAULT_LIMIT,
            },
        },
        {
            "name": "cursor",
            "in": "query",
            "description": "The previous page's next_cursor",
            "schema": {"type": "string"},
        },
    ]
    for f in resource.fields:
        if f.filterable:
            params.append(
                {"name": f.name, "in": "query", "schema": _field_schema(f, for_input=True)}
            )
    return params


def _id_parameter(resource: Resource) -> dict[str, Any]:
    schema = (
        {"type": "string", "format": "uuid"}
        if resource.kind == "upload"
        else {
            "type": "integer",
            "format": "int64",
        }
    )
    return {"name": "id", "in": "path", "required": True, "schema": schema}


def _ref(resource: Resource) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{_schema_name(resource)}"}


def _event_note(resource: Resource, change: Change) -> str:
    return f"Publishes `{resource.event_type(change)}` with the row as answered."


def _collection_paths(resource: Resource) -> dict[str, Any]:
    ops = resource.operations
    paths: dict[str, Any] = {}
    row = _ref(resource)
    collection: dict[str, Any] = {}
    nested_param = [_id_parameter(resource)] if resource.parent else []
    parent_missing = (
        {"404": _json(_ERROR, "No such parent row in this school")} if resource.parent else {}
    )
    if "list" in ops:
        page = {
            "type": "object",
            "required": ["data", "next_cursor"],
            "properties": {
                "data": {"type": "array", "items": row},
                "next_cursor": {"oneOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
        collection["get"] = {
            "summary": f"List {resource.summary.lower()}",
            "operationId": f"list_{_nested_prefix(resource)}{resource.name.replace('-', '_')}",
            "security": _security(resource.read_scopes),
            "parameters": nested_param + _list_parameters(resource),
            "responses": {
                "200": _json(page, "A page, oldest first"),
                **_errors("401", "403", "422"),
                **parent_missing,
            },
        }
    if "create" in ops:
        collection["post"] = {
            "summary": f"Create: {resource.summary.lower()}",
            "operationId": f"create_{_nested_prefix(resource)}{resource.singular}",
            "description": _event_note(resource, "created"),
            "security": _security(resource.write_scopes),
            "parameters": nested_param,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _input_schema(resource, creating=True)}},
            },
            "responses": {
                "201": _json(row, "Created"),
                **_errors("400", "413", "401", "403", "409", "422"),
                **parent_missing,
            },
        }
    if collection:
        paths[resource.path] = collection
    item: dict[str, Any] = {}
    if resource.parent is None and "get" in ops:
        item["get"] = {
            "summary": f"One of: {resource.summary.lower()}",
            "operationId": f"get_{resource.singular}",
            "security": _security(resource.read_scopes),
            "responses": {"200": _json(row, "The row"), **_errors("401", "403", "404")},
        }
    if resource.parent is None and "update" in ops:
        item["patch"] = {
            "summary": "Change some fields",
            "operationId": f"update_{resource.singular}",
            "description": _event_note(resource, "updated"),
            "security": _security(resource.write_scopes),
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": _input_schema(resource, creating=False)}
                },
            },
            "responses": {
                "200": _json(row, "The row as changed"),
                **_errors("400", "413", "401", "403", "404", "409", "422"),
            },
        }
    if resource.parent is None and "delete" in ops:
        item["delete"] = {
            "summary": "Delete",
            "operationId": f"delete_{resource.singular}",
            "description": _event_note(resource, "deleted"),
            "security": _security(resource.write_scopes),
            "responses": {"204": {"description": "Deleted"}, **_errors("401", "403", "404")},
        }
    if item:
        item["parameters"] = [_id_parameter(resource)]
        paths[f"{resource.path}/{{id}}"] = item
    return paths


def _nested_prefix(resource: Resource) -> str:
    """`member_` for a member's enrollments, so their operations differ from the top-level
    enrollments' ones."""
    if resource.parent is None:
        return ""
    return f"{BY_NAME[resource.parent.resource].singular}_"


def _singleton_paths() -> dict[str, Any]:
    by_name = {r.name: r for r in CATALOGUE}
    settings, site_info, analytics = by_name["settings"], by_name["site-info"], by_name["analytics"]
    uploads, appearance = by_name["uploads"], by_name["settings/appearance"]
    return {
        "/api/v1/settings/appearance": {
            "get": {
                "summary": appearance.summary,
                "operationId": "get_appearance",
                "security": _security(appearance.read_scopes),
                "responses": {
                    "200": _json(_ref(appearance), "The appearance settings"),
                    **_errors("401", "403"),
                },
            },
            "patch": {
                "summary": "Change the appearance and theme",
                "operationId": "update_appearance",
                "description": _event_note(appearance, "updated"),
                "security": _security(appearance.write_scopes),
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _input_schema(appearance, creating=False)}
                    },
                },
                "responses": {
                    "200": _json(_ref(appearance), "The appearance as changed"),
                    **_errors("400", "413", "401", "403", "422"),
                },
            },
        },
        "/api/v1/settings": {
            "get": {
                "summary": settings.summary,
                "operationId": "get_settings",
                "security": _security(settings.read_scopes),
                "responses": {
                    "200": _json(_ref(settings), "The settings"),
                    **_errors("401", "403"),
                },
            },
            "patch": {
                "summary": "Change settings: school fields need school:write, appearance "
                "fields appearance:write (see x-required-scopes)",
                "operationId": "update_settings",
                "description": _event_note(settings, "updated")
                + " With an appearance field, `appearance.updated` too (its fields only).",
                "security": _security(settings.write_scopes),
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _input_schema(settings, creating=False)}
                    },
                },
                "responses": {
                    "200": _json(_ref(settings), "The settings as changed"),
                    **_errors("400", "413", "401", "403", "422"),
                },
            },
        },
        "/api/v1/site-info": {
            "get": {
                "summary": site_info.summary,
                "operationId": "get_site_info",
                "security": _security(site_info.read_scopes),
                "responses": {"200": _json(_ref(site_info), "Site info"), **_errors("401", "403")},
            }
        },
        "/api/v1/analytics": {
            "get": {
                "summary": analytics.summary,
                "operationId": "get_analytics",
                "security": _security(analytics.read_scopes),
                "responses": {"200": _json(_ref(analytics), "Figures"), **_errors("401", "403")},
            }
        },
        "/api/v1/uploads": {
            "post": {
                "summary": "Announce an image upload (MCP upload_image): answers upload_url",
                "operationId": "upload_image",
                "description": _event_note(uploads, "created"),
                "security": _security(uploads.write_scopes),
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _input_schema(uploads, creating=True)}
                    },
                },
                "responses": {
                    "201": _json(_ref(uploads), "The pending upload"),
                    **_errors("400", "413", "401", "403", "422"),
                },
            }
        },
        "/api/v1/uploads/{id}/confirm": {
            "parameters": [_id_parameter(uploads)],
            "post": {
                "summary": "Confirm the bytes were uploaded (MCP confirm_upload)",
                "operationId": "confirm_upload",
                "description": _event_note(uploads, "updated"),
                "security": _security(uploads.write_scopes),
                "responses": {
                    "200": _json(_ref(uploads), "The confirmed upload"),
                    **_errors("401", "403", "404"),
                    "409": _json(
                        _ERROR,
                        "upload_incomplete: PUT the bytes first; upload_expired: announce again",
                    ),
                },
            },
        },
        **_storage_paths(),
    }


def _storage_paths() -> dict[str, Any]:
    """The storage edge (storage_edge.py): the signed PUT and the public files, no token."""
    segments = [
        {"name": "school", "in": "path", "required": True, "schema": {"type": "integer"}},
        {
            "name": "upload",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "format": "uuid"},
        },
        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
    ]
    signed = [
        {"name": name, "in": "query", "required": True, "schema": {"type": kind}}
        for name, kind in (
            ("expires", "integer"),
            ("size", "integer"),
            ("type", "string"),
            ("signature", "string"),
        )
    ]
    image = {"image/*": {"schema": {"type": "string", "format": "binary"}}}
    return {
        "/storage/uploads/{school}/{upload}/{name}": {
            "parameters": segments,
            "put": {
                "summary": "PUT an upload's bytes to its signed upload_url (no bearer token)",
                "operationId": "put_upload_bytes",
                "security": [],
                "parameters": signed,
                "requestBody": {"required": True, "content": image},
                "responses": {
                    "201": {"description": "Stored; Location names the file's url"},
                    "400": _json(_ERROR, "size_mismatch: fewer bytes than announced"),
                    "403": _json(_ERROR, "invalid_signature or upload_url_expired"),
                    "404": _json(_ERROR, "Not an upload URL's path"),
                    "409": _json(_ERROR, "already_stored: the bytes were PUT already"),
                    "413": _json(_ERROR, "payload_too_large: more bytes than announced"),
                    "415": _json(_ERROR, "unsupported_media_type: not the announced image"),
                },
            },
        },
        "/storage/files/{school}/{upload}/{name}": {
            "parameters": segments,
            "get": {
                "summary": "A stored upload (public; immutable, cacheable)",
                "operationId": "get_uploaded_file",
                "security": [],
                "responses": {
                    "200": {"description": "The image", "content": image},
                    "304": {"description": "Not modified (If-None-Match)"},
                    "404": _json(_ERROR, "No such file"),
                },
            },
        },
    }


@cache
def document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for resource in COLLECTIONS:
        paths.update(_collection_paths(resource))
    paths.update(_singleton_paths())
    probe = {"type": "object"}
    paths["/healthz"] = {
        "get": {"summary": "Liveness", "security": [], "responses": {"200": _json(probe, "ok")}}
    }
    paths["/readyz"] = {
        "get": {
            "summary": "Readiness: PostgreSQL and Redis reachable",
            "security": [],
            "responses": {"200": _json(probe, "ready"), "503": _json(probe, "unavailable")},
        }
    }
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics",
            "security": [],
            "responses": {"200": {"description": "text exposition"}},
        }
    }
    scopes = sorted({s for r in CATALOGUE for s in (*r.read_scopes, *r.write_scopes)})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Loopwise Connect school API",
            "version": "1",
            "description": "A school's data: courses, members, orders and the rest of the "
            "seeds' world. Reached through the gateway with a Bearer token "
            "(https://{school}.loopwise.com/api/v1/...); every answer holds the token's school's "
            "rows only. Lists answer {data, next_cursor}; pass next_cursor back as cursor. "
            "Every change publishes an event (x-event-types) that webhooks deliver.",
        },
        "servers": [
            {"url": "https://{school}.loopwise.com", "variables": {"school": {"default": "demo"}}}
        ],
        "security": [{"oauth2": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "oauth2": {
                    "type": "oauth2",
                    "description": "The gateway's Bearer token; the umbrella scopes read and "
                    "write stand for every :read and every :write scope. Each school is its own "
                    "authorization server: the flow URLs below are the demo school's, and "
                    "another school's are the same paths on https://{school}.loopwise.com.",
                    "flows": {
                        # OpenAPI requires absolute URIs here, and a `{school}` template is not
                        # one, so the document names a real school's endpoints.
                        "authorizationCode": {
                            "authorizationUrl": "https://demo.loopwise.com/v1/oauth/authorize",
                            "tokenUrl": "https://demo.loopwise.com/v1/oauth/token",
                            "scopes": {
                                s: SCOPES[s].description for s in [*scopes, "read", "write"]
                            },
                        }
                    },
                }
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {"type": "string"},
                        "error_description": {"type": "string"},
                        "scope": {"type": "string"},
                        "fields": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                },
                **{_schema_name(r): _row_schema(r) for r in CATALOGUE},
            },
        },
        "x-event-types": {name: list(s) for name, s in event_scopes().items()},
    }
