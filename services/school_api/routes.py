"""The school API's endpoints: thin handlers over validation and the store.

Each handler does the same four things in the same order: who is calling and may they
(scopes), what did they send (validation), do it (store, which writes the event in the same
transaction), answer. Collections get their handlers from one factory per operation,
configured by their catalogue entry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from uuid import UUID, uuid4

from aiohttp import web

from libs.common.scopes import satisfies
from services.school_api import openapi, store, uploads, validation
from services.school_api.context import context
from services.school_api.identity import caller
from services.school_api.resources import (
    ANALYTICS,
    APPEARANCE,
    BY_NAME,
    COLLECTIONS,
    SETTINGS,
    SITE_INFO,
    UPLOADS,
)
from services.school_api.resources.model import Resource
from services.school_api.responses import ApiError, json, not_found, validation_failed

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _page_answer(rows: list[store.Row], limit: int) -> web.Response:
    return json({"data": rows[:limit], "next_cursor": validation.next_cursor(rows, limit)})


def list_handler(resource: Resource) -> Handler:
    parent = BY_NAME[resource.parent.resource] if resource.parent else None

    async def handler(request: web.Request) -> web.Response:
        who = caller(request)
        who.require(resource.read_scopes)
        page = validation.page(resource, request.query)
        filters = page.filters
        parent_id = 0
        if resource.parent is not None:
            parent_id = validation.path_id(request)
            filters = {resource.parent.field: parent_id, **filters}
        pool = context(request).pool
        # One more row than asked says whether another page follows, in the same query.
        rows = await store.list_rows(
            pool, resource, who.school_id, after=page.after, limit=page.limit + 1, filters=filters
        )
        # An empty page of a nested list may mean the parent is not this school's: say so.
        if (
            not rows
            and parent is not None
            and not await store.exists(pool, parent, who.school_id, parent_id)
        ):
            raise not_found()
        return _page_answer(rows, page.limit)

    return handler


def get_handler(resource: Resource) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        who = caller(request)
        who.require(resource.read_scopes)
        row_id = validation.path_id(request)
        row = await store.get_row(context(request).pool, resource, who.school_id, row_id)
        if row is None:
            raise not_found()
        return json(row)

    return handler


def create_handler(resource: Resource) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        who = caller(request)
        who.require(resource.write_scopes)
        parent_id = validation.path_id(request) if resource.parent else None
        values = validation.for_create(resource, await validation.read_object(request))
        if resource.parent is not None:
            values = {resource.parent.field: parent_id, **values}
        try:
            row = await store.create_row(context(request).pool, resource, who.school_id, values)
        except store.ReferenceNotFound as exc:
            # The parent named in the path is not this school's: the URL does not exist.
            if resource.parent is not None and exc.field == resource.parent.field:
                raise not_found() from None
            raise
        location = f"/api/v1/{resource.name}/{row['id']}" if resource.parent is None else None
        return json(row, status=201, headers={"Location": location} if location else None)

    return handler


def update_handler(resource: Resource) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        who = caller(request)
        who.require(resource.write_scopes)
        row_id = validation.path_id(request)
        values = validation.for_update(resource, await validation.read_object(request))
        row = await store.update_row(context(request).pool, resource, who.school_id, row_id, values)
        if row is None:
            raise not_found()
        return json(row)

    return handler


def delete_handler(resource: Resource) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        who = caller(request)
        who.require(resource.write_scopes)
        row_id = validation.path_id(request)
        if await store.delete_row(context(request).pool, resource, who.school_id, row_id) is None:
            raise not_found()
        return web.Response(status=204)

    return handler


async def get_settings(request: web.Request) -> web.Response:
    who = caller(request)
    who.require(SETTINGS.read_scopes)
    return json(await store.get_settings(context(request).pool, who.school_id))


async def update_settings(request: web.Request) -> web.Response:
    who = caller(request)
    who.require(SETTINGS.write_scopes)
    values = validation.for_update(SETTINGS, await validation.read_object(request))
    # appearance:write may change the theme but not the school's name, and the reverse.
    for scopes in validation.field_scopes(SETTINGS, values):
        who.require(scopes)
    row = await store.update_settings(context(request).pool, who.school_id, values)
    # A caller that may only change the theme is answered the theme: the rest of the
    # settings (contact email, time zone...) is not appearance:write's to read.
    if not satisfies(who.scopes, ("school:read", "school:write")):
        return json(store.appearance_of(row))
    return json(row)


async def get_appearance(request: web.Request) -> web.Response:
    who = caller(request)
    who.require(APPEARANCE.read_scopes)
    return json(store.appearance_of(await store.get_settings(context(request).pool, who.school_id)))


async def update_appearance(request: web.Request) -> web.Response:
    who = caller(request)
    who.require(APPEARANCE.write_scopes)
    values = validation.for_update(APPEARANCE, await validation.read_object(request))
    row = await store.update_settings(context(request).pool, who.school_id, values)
    return json(store.appearance_of(row))


async def get_site_info(request: web.Request) -> web.Response:
    who = caller(request)
    who.require(SITE_INFO.read_scopes)
    return json(await store.site_info(context(request).pool, who.school_id))


async def get_analytics(request: web.Request) -> web.Response:
    who = caller(request)
    who.require(ANALYTICS.read_scopes)
    return json(await store.analytics(context(request).pool, who.school_id))


async def create_upload(request: web.Request) -> web.Response:
    who = caller(request)
    who.require(UPLOADS.write_scopes)
    values = validation.for_create(UPLOADS, await validation.read_object(request))
    if not uploads.good_filename(values["filename"]):
        raise validation_failed({"filename": "invalid"})
    ctx = context(request)
    upload_id = uuid4()
    urls = uploads.urls_for(
        ctx.settings,
        who.school_id,
        upload_id,
        values["filename"],
        values["content_type"],
        values["size_bytes"],
        datetime.now(UTC),
    )
    row = await store.create_upload(
        ctx.pool,
        who.school_id,
        upload_id,
        values,
        upload_url=urls.upload_url,
        url=urls.url,
        expires_at=urls.expires_at,
    )
    return json(row, status=201)


async def confirm_upload(request: web.Request) -> web.Response:
    who = caller(request)
    who.require(UPLOADS.write_scopes)
    try:
        upload_id = UUID(request.match_info["id"])
    except ValueError:
        raise not_found() from None
    ctx = context(request)
    existing = await store.get_upload(ctx.pool, who.school_id, upload_id)
    if existing is None:
        raise not_found()
    if existing["status"] == "pending":
        if not await ctx.objects.exists(uploads.object_key(who.school_id, upload_id)):
            if existing["expires_at"] <= datetime.now(UTC):
                raise _upload_expired()
            raise ApiError(
                409,
                "upload_incomplete",
                error_description="PUT the bytes to upload_url before confirming.",
            )
        row = await store.confirm_upload(ctx.pool, who.school_id, upload_id)
        if row is not None:
            return json(row)
        existing = await store.get_upload(ctx.pool, who.school_id, upload_id) or existing
    if existing["status"] == "confirmed":
        return json(existing)  # confirming twice is a retry, not an error
    raise _upload_expired()


def _upload_expired() -> ApiError:
    return ApiError(409, "upload_expired", error_description="Announce the upload again.")


async def openapi_document(request: web.Request) -> web.Response:
    return json(openapi.document())


def setup(app: web.Application) -> None:
    router = app.router
    for resource in COLLECTIONS:
        ops = resource.operations
        if "list" in ops:
            router.add_get(resource.path, list_handler(resource))
        if "create" in ops:
            router.add_post(resource.path, create_handler(resource))
        if resource.parent is not None:
            continue  # nested collections are lists (and creates) only
        item = f"{resource.path}/{{id}}"
        if "get" in ops:
            router.add_get(item, get_handler(resource))
        if "update" in ops:
            router.add_patch(item, update_handler(resource))
        if "delete" in ops:
            router.add_delete(item, delete_handler(resource))
    router.add_get(f"/api/v1/{SETTINGS.name}", get_settings)
    router.add_patch(f"/api/v1/{SETTINGS.name}", update_settings)
    router.add_get(f"/api/v1/{APPEARANCE.name}", get_appearance)
    router.add_patch(f"/api/v1/{APPEARANCE.name}", update_appearance)
    router.add_get(f"/api/v1/{SITE_INFO.name}", get_site_info)
    router.add_get(f"/api/v1/{ANALYTICS.name}", get_analytics)
    router.add_post(f"/api/v1/{UPLOADS.name}", create_upload)
    router.add_post(f"/api/v1/{UPLOADS.name}/{{id}}/confirm", confirm_upload)
    router.add_get("/openapi.json", openapi_document)
