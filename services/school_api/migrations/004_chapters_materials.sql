-- The rest of seed 002's curriculum ("lessons, chapters, materials"): chapters group a course's
-- lessons, materials go with a lesson. Constraint names follow store._constraint_fields, which
-- turns a violation into an answer naming the field.

CREATE TABLE school_api.chapters (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    course_id       bigint      NOT NULL,
    title           text        NOT NULL,
    position        integer     NOT NULL DEFAULT 0,
    description     text        NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT chapters_school_id_id_key UNIQUE (school_id, id),
    -- A lesson's chapter must be of the lesson's course (lessons_chapter_id_fkey below).
    CONSTRAINT chapters_school_course_id_key UNIQUE (school_id, course_id, id),
    CONSTRAINT chapters_course_id_fkey FOREIGN KEY (school_id, course_id)
        REFERENCES school_api.courses (school_id, id) ON DELETE CASCADE
);
CREATE INDEX chapters_course ON school_api.chapters (school_id, course_id, id);

-- Deleting a chapter keeps its lessons, out of any chapter: SET NULL on the chapter column only
-- (PostgreSQL 15), as school_id and course_id are the lesson's own.
ALTER TABLE school_api.lessons ADD COLUMN chapter_id bigint;
ALTER TABLE school_api.lessons ADD CONSTRAINT lessons_chapter_id_fkey
    FOREIGN KEY (school_id, course_id, chapter_id)
    REFERENCES school_api.chapters (school_id, course_id, id) ON DELETE SET NULL (chapter_id);
CREATE INDEX lessons_chapter ON school_api.lessons (school_id, chapter_id, id)
    WHERE chapter_id IS NOT NULL;

CREATE TABLE school_api.materials (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    school_id       bigint      NOT NULL,
    lesson_id       bigint      NOT NULL,
    title           text        NOT NULL,
    kind            text        NOT NULL DEFAULT 'file' CHECK (kind IN ('file', 'link', 'text')),
    url             text,
    body            text        NOT NULL DEFAULT '',
    position        integer     NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT materials_school_id_id_key UNIQUE (school_id, id),
    CONSTRAINT materials_lesson_id_fkey FOREIGN KEY (school_id, lesson_id)
        REFERENCES school_api.lessons (school_id, id) ON DELETE CASCADE
);
CREATE INDEX materials_lesson ON school_api.materials (school_id, lesson_id, id);
