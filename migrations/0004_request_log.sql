-- One row per HTTP request, refused ones included: who asked what, from where, with which
-- answer and how fast. Written in batches off the request path; purged after a retention
-- period by the maintenance worker. Never holds bodies, tokens or query strings.
CREATE TABLE request_log (
    id          bigserial   PRIMARY KEY,
    at          timestamptz NOT NULL,
    -- The x-request-id also returned to the caller as a response header.
    request_id  text        NOT NULL,
    -- The authenticated client; NULL when the request was refused before authentication.
    client_id   uuid,
    source_ip   inet        NOT NULL,
    user_agent  text        CHECK (length(user_agent) <= 512),
    host        text,
    method      text        NOT NULL,
    -- The route template (`/v1/keys/{id}`), never the raw path; `(unmatched)` for no route.
    path        text        NOT NULL,
    status      smallint    NOT NULL,
    error_code  text,
    latency_us  bigint      NOT NULL CHECK (latency_us >= 0)
);
CREATE INDEX request_log_at ON request_log (at);
CREATE INDEX request_log_request_id ON request_log (request_id);
