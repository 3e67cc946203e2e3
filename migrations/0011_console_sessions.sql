-- Sessions of the officer's console (`/console/`). The session id lives only in the officer's
-- cookie; this table keeps its SHA-256, so a dump of it cannot be replayed as a cookie. Every
-- broker reads the same rows: signing out (the row deleted) ends the session everywhere.
CREATE TABLE console_sessions (
    id_sha256     bytea       PRIMARY KEY CHECK (length(id_sha256) = 32),
    client_id     uuid        NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
    -- The per-session token every state-changing form must carry back.
    csrf_token    text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX console_sessions_client ON console_sessions (client_id);
CREATE INDEX console_sessions_last_seen ON console_sessions (last_seen_at);
