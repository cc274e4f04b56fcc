"""The webhooks service's OpenAPI 3.1 document, including the deliveries it makes."""

from __future__ import annotations

from typing import Any

_TIME = {"type": ["string", "null"], "format": "date-time"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _page(item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["data", "next_cursor"],
        "properties": {
            "data": {"type": "array", "items": _ref(item)},
            "next_cursor": {"type": ["string", "null"]},
        },
    }


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
_DELIVERY_ID = {**_ID, "name": "delivery_id"}
_PAGING = [
    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
]

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "error_description": {"type": "string"},
            "field": {"type": "string"},
            "scope": {"type": "string", "description": "the scope(s) the request lacked"},
        },
    },
    "WebhookInput": {
        "type": "object",
        "required": ["url", "event_types"],
        "additionalProperties": False,
        "properties": {
            "url": {
                "type": "string",
                "format": "uri",
                "maxLength": 2048,
                "description": "https (http in development); no credentials; must not point "
                "at private, loopback, link-local, CGNAT or metadata addresses",
            },
            "event_types": {
                "type": "array",
                "minItems": 1,
                "maxItems": 100,
                "items": {"type": "string", "examples": ["course.updated", "course.*"]},
            },
            "description": {"type": "string", "maxLength": 500},
        },
    },
    "WebhookPatch": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "url": {"type": "string", "format": "uri"},
            "event_types": {"type": "array", "items": {"type": "string"}},
            "description": {"type": "string"},
            "disabled": {"type": "boolean", "description": "false re-enables a disabled webhook"},
        },
    },
    "Webhook": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "url": {"type": "string"},
            "event_types": {"type": "array", "items": {"type": "string"}},
            "description": {"type": "string"},
            "status": {"enum": ["active", "disabled"]},
            "disabled_reason": {
                "enum": ["gone", "failing", "grant_revoked", "client", "admin", None]
            },
            "disabled_at": _TIME,
            "failing_since": _TIME,
            "previous_secret_expires_at": _TIME,
            "school_id": {"type": "integer"},
            "client_id": {"type": "string"},
            "created_at": _TIME,
            "updated_at": _TIME,
        },
    },
    "WebhookWithSecret": {
        "allOf": [
            _ref("Webhook"),
            {
                "type": "object",
                "properties": {
                    "secret": {
                        "type": "string",
                        "pattern": "^whsec_",
                        "description": "shown once; verify deliveries with it",
                    }
                },
            },
        ]
    },
    "Attempt": {
        "type": "object",
        "properties": {
            "attempted_at": _TIME,
            "response_status": {"type": ["integer", "null"]},
            "latency_ms": {"type": "integer"},
            "response_excerpt": {"type": ["string", "null"], "description": "first 200 bytes"},
            "error": {"type": ["string", "null"]},
            "outcome": {"enum": ["delivered", "retry", "dead", "gone"]},
            "next_attempt_at": _TIME,
        },
    },
    "Delivery": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "webhook_id": {"type": "string", "format": "uuid"},
            "event_id": {"type": "string"},
            "event_type": {"type": "string"},
            "status": {"enum": ["pending", "delivered", "dead", "cancelled"]},
            "attempt_count": {"type": "integer"},
            "next_attempt_at": _TIME,
            "last_response_status": {"type": ["integer", "null"]},
            "delivered_at": _TIME,
            "created_at": _TIME,
            "attempts": {"type": "array", "items": _ref("Attempt")},
        },
    },
    "Event": {
        "type": "object",
        "description": "The body of every delivery, signed per the Standard Webhooks spec: "
        "headers webhook-id (the event id, stable across retries), webhook-timestamp, "
        "webhook-signature (v1,<base64 HMAC-SHA256 of id.timestamp.body>, space-separated "
        "while a rotated secret is still honoured).",
        "required": ["id", "type", "school_id", "occurred_at", "data"],
        "properties": {
            "id": {"type": "string"},
            "type": {"type": "string"},
            "school_id": {"type": "integer"},
            "occurred_at": {"type": "string", "format": "date-time"},
            "data": {"type": "object"},
        },
    },
}

_ERROR = _json(_ref("Error"), "Error")
_ERRORS = {
    "401": _json(_ref("Error"), "Not called through the gateway"),
    "404": _json(_ref("Error"), "No such webhook for this client and school"),
}
_NOT_JSON = {"400": _json(_ref("Error"), "The body is not JSON")}
_BAD_QUERY = {"422": _json(_ref("Error"), "A query parameter is out of range; `field` names it")}
_OBJECT = {"type": "object"}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_CATALOGUE = {
    "type": "object",
    "required": ["data", "wildcards", "scope_rule"],
    "properties": {
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "scope", "scopes", "source", "description"],
                "properties": {
                    "type": {"type": "string", "examples": ["order.paid"]},
                    "scope": {
                        "type": ["string", "null"],
                        "description": "The scope a subscription needs; null: none",
                    },
                    "scopes": {**_STRINGS, "description": "Any one of these is enough"},
                    "source": {
                        "type": "string",
                        "description": "The API write or storefront action that emits it",
                        "examples": ["storefront checkout --paid"],
                    },
                    "description": {"type": "string"},
                },
            },
        },
        "wildcards": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"pattern": {"type": "string"}, "scopes": _STRINGS},
            },
        },
        "scope_rule": {"type": "string", "enum": ["any_of"]},
    },
}


_INFO: dict[str, Any] = {
    "title": "Loopwise Connect webhooks",
    "version": "1",
    "description": "Webhook subscriptions and their delivery log. `/api/v1/webhooks` "
    "is reached through the gateway with a user's access token; each event type "
    "needs the scope that gates it (GET /v1/webhooks/event-types).",
}


_PATHS: dict[str, Any] = {
    "/api/v1/webhooks": {
        "post": {
            "summary": "Subscribe a URL to event types",
            "requestBody": {
                "content": {
                    "application/json": {
                        "schema": _ref("WebhookInput"),
                        "example": {
                            "url": "https://hooks.partner.example/loopwise",
                            "event_types": ["course.updated", "member.*"],
                        },
                    }
                }
            },
            "responses": {
                "201": _json(_ref("WebhookWithSecret"), "Created; the secret is shown once"),
                "403": _json(_ref("Error"), "insufficient_scope: the grant lacks `scope`"),
                "409": _ERROR,
                "422": _ERROR,
                **_NOT_JSON,
                **_ERRORS,
            },
        },
        "get": {
            "summary": "This client's webhooks at this school",
            "parameters": _PAGING,
            "responses": {
                "200": _json(_page("Webhook"), "A page"),
                **_BAD_QUERY,
                **_ERRORS,
            },
        },
    },
    "/api/v1/webhooks/{id}": {
        "parameters": [_ID],
        "get": {"responses": {"200": _json(_ref("Webhook"), "The webhook"), **_ERRORS}},
        "patch": {
            "requestBody": {"content": {"application/json": {"schema": _ref("WebhookPatch")}}},
            "responses": {
                "200": _json(_ref("Webhook"), "Changed"),
                "403": _ERROR,
                "409": _json(
                    _ref("Error"),
                    "disabled_by_admin: only the school's admin can enable it again",
                ),
                "422": _ERROR,
                **_NOT_JSON,
                **_ERRORS,
            },
        },
        "delete": {"responses": {"204": {"description": "Deleted"}, **_ERRORS}},
    },
    "/api/v1/webhooks/{id}/rotate-secret": {
        "parameters": [_ID],
        "post": {
            "summary": "A new secret, shown once; the old one signs too until "
            "previous_secret_expires_at",
            "responses": {
                "200": _json(_OBJECT, "id, secret, previous_secret_expires_at"),
                **_ERRORS,
            },
        },
    },
    "/api/v1/webhooks/{id}/deliveries": {
        "parameters": [_ID],
        "get": {
            "summary": "Deliveries, newest first, each with every attempt; "
            "status=dead is the dead-letter list",
            "parameters": [
                *_PAGING,
                {
                    "name": "status",
                    "in": "query",
                    "schema": {"enum": ["pending", "delivered", "dead", "cancelled"]},
                },
            ],
            "responses": {
                "200": _json(_page("Delivery"), "A page"),
                **_BAD_QUERY,
                **_ERRORS,
            },
        },
    },
    "/api/v1/webhooks/{id}/deliveries/{delivery_id}": {
        "parameters": [_ID, _DELIVERY_ID],
        "get": {"responses": {"200": _json(_ref("Delivery"), "The delivery"), **_ERRORS}},
    },
    "/api/v1/webhooks/{id}/deliveries/{delivery_id}/retry": {
        "parameters": [_ID, _DELIVERY_ID],
        "post": {
            "summary": "Send again now (dead-lettered ones included)",
            "responses": {
                "202": _json(_ref("Delivery"), "Queued"),
                "409": _json(_ref("Error"), "The webhook is disabled"),
                **_ERRORS,
            },
        },
    },
    "/v1/webhooks/event-types": {
        "get": {
            "summary": "Every event type the system emits, the scope that gates it and its source",
            "responses": {"200": _json(_CATALOGUE, "The table")},
        }
    },
    "/v1/webhooks/egress-ips": {
        "get": {
            "summary": "The addresses deliveries come from, for partners' allowlists",
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "egress_ips": {"type": "array", "items": {"type": "string"}}
                        },
                    },
                    "The addresses",
                )
            },
        }
    },
    "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _json(_OBJECT, "ok")}}},
    "/readyz": {
        "get": {
            "summary": "Readiness: PostgreSQL and Redis reachable",
            "responses": {"200": _json(_OBJECT, "ready"), "503": _json(_OBJECT, "unavailable")},
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "responses": {"200": {"description": "text exposition format"}},
        }
    },
}


_WEBHOOKS: dict[str, Any] = {
    "event": {
        "post": {
            "summary": "A delivery to a subscribed URL",
            "requestBody": {"content": {"application/json": {"schema": _ref("Event")}}},
            "responses": {
                "2XX": {"description": "Delivered"},
                "410": {"description": "Disables the webhook"},
                "429": {"description": "Retried, honouring Retry-After"},
            },
        }
    }
}


def document() -> dict[str, Any]:
    """A new top-level document each time: the routes add the internal API's paths to it."""
    return {
        "openapi": "3.1.0",
        "info": _INFO,
        "paths": dict(_PATHS),
        "webhooks": _WEBHOOKS,
        "components": {"schemas": _SCHEMAS},
    }
