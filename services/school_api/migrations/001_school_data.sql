-- The school API's data: the seeds' school world (courses, members, orders, ...), every row
-- keyed by school, plus the transactional outbox its events leave through.
--
-- Everything lives in its own schema so that names the seeds' world shares with other
-- services (events, subscriptions, settings, comments) never collide with theirs.
--
-- Ids are bigint identities: compact, ordered (keyset pagination walks them), and never
-- reused. Every table has UNIQUE (school_id, id): the index every tenant-scoped lookup and
-- page walks, and the target of composite foreign keys, so a row can only ever point at a row
-- of its own school, whatever a bug upstream might try.
--
-- There is deliberately no foreign key to identity's `schools`: the school id is the tenant
-- key the gateway vouches for, and this service does not reach into another service's tables.

CREATE SCHEMA school_api;

CREATE TABLE school_api.lecturers (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    name            text        NOT NULL,
    email           text,
    bio             text        NOT NULL DEFAULT '',
    avatar_url      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT lecturers_school_id_id_key UNIQUE (school_id, id)
);

CREATE TABLE school_api.courses (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    title           text        NOT NULL,
    description     text        NOT NULL DEFAULT '',
    status          text        NOT NULL DEFAULT 'draft'
                    CHECK (status IN ('draft', 'published', 'archived')),
    price_cents     bigint      NOT NULL DEFAULT 0 CHECK (price_cents >= 0),
    currency        text        NOT NULL DEFAULT 'USD',
    lecturer_id     bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT courses_school_id_id_key UNIQUE (school_id, id),
    CONSTRAINT courses_lecturer_id_fkey FOREIGN KEY (school_id, lecturer_id)
        REFERENCES school_api.lecturers (school_id, id) ON DELETE SET NULL (lecturer_id)
);

CREATE TABLE school_api.members (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    name            text        NOT NULL,
    email           text        NOT NULL,
    status          text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    enrolled_at     timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT members_school_id_id_key UNIQUE (school_id, id)
);
CREATE UNIQUE INDEX members_email_key ON school_api.members (school_id, lower(email));

CREATE TABLE school_api.enrollments (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    member_id       bigint      NOT NULL,
    course_id       bigint      NOT NULL,
    status          text        NOT NULL DEFAULT 'active'
                    CHECK (status IN ('active', 'completed', 'cancelled')),
    progress_percent integer    NOT NULL DEFAULT 0 CHECK (progress_percent BETWEEN 0 AND 100),
    enrolled_at     timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT enrollments_school_id_id_key UNIQUE (school_id, id),
    CONSTRAINT enrollments_course_id_key UNIQUE (school_id, member_id, course_id),
    CONSTRAINT enrollments_member_id_fkey FOREIGN KEY (school_id, member_id)
        REFERENCES school_api.members (school_id, id) ON DELETE CASCADE,
    CONSTRAINT enrollments_course_id_fkey FOREIGN KEY (school_id, course_id)
        REFERENCES school_api.courses (school_id, id) ON DELETE CASCADE
);
CREATE INDEX enrollments_member ON school_api.enrollments (school_id, member_id, id);
CREATE INDEX enrollments_course ON school_api.enrollments (school_id, course_id);

CREATE TABLE school_api.orders (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    member_id       bigint      NOT NULL,
    course_id       bigint,
    amount_cents    bigint      NOT NULL CHECK (amount_cents >= 0),
    currency        text        NOT NULL DEFAULT 'USD',
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'paid', 'refunded', 'failed')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT orders_school_id_id_key UNIQUE (school_id, id),
    CONSTRAINT orders_member_id_fkey FOREIGN KEY (school_id, member_id)
        REFERENCES school_api.members (school_id, id),
    CONSTRAINT orders_course_id_fkey FOREIGN KEY (school_id, course_id)
        REFERENCES school_api.courses (school_id, id) ON DELETE SET NULL (course_id)
);
CREATE INDEX orders_member ON school_api.orders (school_id, member_id, id);
CREATE INDEX orders_course ON school_api.orders (school_id, course_id);

CREATE TABLE school_api.lessons (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    course_id       bigint      NOT NULL,
    title           text        NOT NULL,
    position        integer     NOT NULL DEFAULT 0,
    content         text        NOT NULL DEFAULT '',
    duration_minutes integer,
    status          text        NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'published')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT lessons_school_id_id_key UNIQUE (school_id, id),
    CONSTRAINT lessons_course_id_fkey FOREIGN KEY (school_id, course_id)
        REFERENCES school_api.courses (school_id, id) ON DELETE CASCADE
);
CREATE INDEX lessons_course ON school_api.lessons (school_id, course_id, id);

CREATE TABLE school_api.reviews (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    course_id       bigint      NOT NULL,
    member_id       bigint,
    rating          smallint    NOT NULL CHECK (rating BETWEEN 1 AND 5),
    body            text        NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT reviews_school_id_id_key UNIQUE (school_id, id),
    CONSTRAINT reviews_course_id_fkey FOREIGN KEY (school_id, course_id)
        REFERENCES school_api.courses (school_id, id) ON DELETE CASCADE,
    CONSTRAINT reviews_member_id_fkey FOREIGN KEY (school_id, member_id)
        REFERENCES school_api.members (school_id, id) ON DELETE SET NULL (member_id)
);
CREATE INDEX reviews_course ON school_api.reviews (school_id, course_id, id);

CREATE TABLE school_api.membership_plans (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    name            text        NOT NULL,
    description     text        NOT NULL DEFAULT '',
    price_cents     bigint      NOT NULL DEFAULT 0 CHECK (price_cents >= 0),
    currency        text        NOT NULL DEFAULT 'USD',
    billing_interval text       NOT NULL DEFAULT 'month'
                    CHECK (billing_interval IN ('month', 'year')),
    status          text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'archived')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT membership_plans_school_id_id_key UNIQUE (school_id, id)
);

CREATE TABLE school_api.subscriptions (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    member_id       bigint      NOT NULL,
    membership_plan_id bigint   NOT NULL,
    status          text        NOT NULL DEFAULT 'active'
                    CHECK (status IN ('active', 'past_due', 'cancelled')),
    started_at      timestamptz NOT NULL DEFAULT now(),
    current_period_end timestamptz,
    cancelled_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT subscriptions_school_id_id_key UNIQUE (school_id, id),
    CONSTRAINT subscriptions_member_id_fkey FOREIGN KEY (school_id, member_id)
        REFERENCES school_api.members (school_id, id),
    CONSTRAINT subscriptions_membership_plan_id_fkey FOREIGN KEY (school_id, membership_plan_id)
        REFERENCES school_api.membership_plans (school_id, id)
);
CREATE INDEX subscriptions_member ON school_api.subscriptions (school_id, member_id);
CREATE INDEX subscriptions_plan ON school_api.subscriptions (school_id, membership_plan_id);

CREATE TABLE school_api.events (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    title           text        NOT NULL,
    description     text        NOT NULL DEFAULT '',
    starts_at       timestamptz NOT NULL,
    ends_at         timestamptz,
    location        text        NOT NULL DEFAULT '',
    capacity        integer,
    status          text        NOT NULL DEFAULT 'scheduled'
                    CHECK (status IN ('scheduled', 'cancelled', 'completed')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_school_id_id_key UNIQUE (school_id, id)
);

CREATE TABLE school_api.attendees (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    event_id        bigint      NOT NULL,
    member_id       bigint      NOT NULL,
    status          text        NOT NULL DEFAULT 'registered'
                    CHECK (status IN ('registered', 'attended', 'cancelled')),
    registered_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT attendees_school_id_id_key UNIQUE (school_id, id),
    CONSTRAINT attendees_member_id_key UNIQUE (school_id, event_id, member_id),
    CONSTRAINT attendees_event_id_fkey FOREIGN KEY (school_id, event_id)
        REFERENCES school_api.events (school_id, id) ON DELETE CASCADE,
    CONSTRAINT attendees_member_id_fkey FOREIGN KEY (school_id, member_id)
        REFERENCES school_api.members (school_id, id) ON DELETE CASCADE
);
CREATE INDEX attendees_event ON school_api.attendees (school_id, event_id, id);
CREATE INDEX attendees_member ON school_api.attendees (school_id, member_id);

CREATE TABLE school_api.coupons (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    code            text        NOT NULL,
    description     text        NOT NULL DEFAULT '',
    discount_percent integer    CHECK (discount_percent BETWEEN 1 AND 100),
    amount_off_cents bigint     CHECK (amount_off_cents > 0),
    currency        text        NOT NULL DEFAULT 'USD',
    max_redemptions integer,
    redeemed_count  integer     NOT NULL DEFAULT 0,
    expires_at      timestamptz,
    active          boolean     NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT coupons_school_id_id_key UNIQUE (school_id, id),
    CONSTRAINT coupons_code_key UNIQUE (school_id, code)
);

CREATE TABLE school_api.posts (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    title           text        NOT NULL,
    body            text        NOT NULL DEFAULT '',
    status          text        NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'published')),
    lecturer_id     bigint,
    published_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT posts_school_id_id_key UNIQUE (school_id, id),
    CONSTRAINT posts_lecturer_id_fkey FOREIGN KEY (school_id, lecturer_id)
        REFERENCES school_api.lecturers (school_id, id) ON DELETE SET NULL (lecturer_id)
);

CREATE TABLE school_api.comments (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    post_id         bigint      NOT NULL,
    member_id       bigint,
    body            text        NOT NULL,
    status          text        NOT NULL DEFAULT 'visible' CHECK (status IN ('visible', 'hidden')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT comments_school_id_id_key UNIQUE (school_id, id),
    CONSTRAINT comments_post_id_fkey FOREIGN KEY (school_id, post_id)
        REFERENCES school_api.posts (school_id, id) ON DELETE CASCADE,
    CONSTRAINT comments_member_id_fkey FOREIGN KEY (school_id, member_id)
        REFERENCES school_api.members (school_id, id) ON DELETE SET NULL (member_id)
);
CREATE INDEX comments_post ON school_api.comments (school_id, post_id, id);

CREATE TABLE school_api.digital_downloads (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    title           text        NOT NULL,
    description     text        NOT NULL DEFAULT '',
    price_cents     bigint      NOT NULL DEFAULT 0 CHECK (price_cents >= 0),
    currency        text        NOT NULL DEFAULT 'USD',
    file_url        text,
    status          text        NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'published')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT digital_downloads_school_id_id_key UNIQUE (school_id, id)
);

-- One row per school; its API `id` is the school id. A school without a row reads defaults.
CREATE TABLE school_api.settings (
    school_id       bigint      PRIMARY KEY,
    name            text        NOT NULL DEFAULT '',
    tagline         text        NOT NULL DEFAULT '',
    description     text        NOT NULL DEFAULT '',
    contact_email   text,
    timezone        text        NOT NULL DEFAULT 'UTC',
    locale          text        NOT NULL DEFAULT 'en',
    currency        text        NOT NULL DEFAULT 'USD',
    logo_url        text,
    primary_color   text        NOT NULL DEFAULT '#1f6feb',
    accent_color    text        NOT NULL DEFAULT '#f0883e',
    theme           text        NOT NULL DEFAULT 'light' CHECK (theme IN ('light', 'dark')),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- An upload is announced first (the client gets a presigned-style URL to PUT the bytes to),
-- then confirmed. Its id is a UUID: it appears in the upload URL, so it must not be guessable.
CREATE TABLE school_api.uploads (
    id              uuid        PRIMARY KEY,
    school_id       bigint      NOT NULL,
    filename        text        NOT NULL,
    content_type    text        NOT NULL,
    size_bytes      bigint      NOT NULL CHECK (size_bytes > 0),
    status          text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'confirmed')),
    upload_url      text        NOT NULL,
    url             text        NOT NULL,
    expires_at      timestamptz NOT NULL,
    confirmed_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX uploads_school ON school_api.uploads (school_id, id);

-- Schools that got the sample data (`make dev`'s demo schools), so seeding runs once each.
CREATE TABLE school_api.seeded_schools (
    school_id       bigint      PRIMARY KEY,
    seeded_at       timestamptz NOT NULL DEFAULT now()
);

-- The transactional outbox: every change writes its event here in the change's own
-- transaction; the relay moves rows to the Redis stream in id order and marks them published.
CREATE TABLE school_api.outbox (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE DEFAULT gen_random_uuid(),  -- the webhook-id
    type            text        NOT NULL,
    school_id       bigint      NOT NULL,
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    data            jsonb       NOT NULL,
    published_at    timestamptz
);
CREATE INDEX outbox_unpublished ON school_api.outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_published ON school_api.outbox (published_at) WHERE published_at IS NOT NULL;

-- NOTIFY is transactional: the relay is woken when the change commits, never for a rollback.
-- One notification per statement is enough; the relay drains everything pending.
CREATE FUNCTION school_api.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('school_api_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON school_api.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION school_api.outbox_notify();
