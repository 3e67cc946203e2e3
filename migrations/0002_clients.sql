-- Machine clients, registered by an officer. The client secret is never stored: only
-- HMAC-SHA256 over it, computed inside the token with keybroker's pepper key, so a dump of this
-- table cannot be used to test guesses offline.
CREATE TABLE clients (
    id                 uuid        PRIMARY KEY,
    name               text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    secret_mac         bytea       NOT NULL,
    ip_mode            text        NOT NULL CHECK (ip_mode IN ('strict', 'none')),
    -- CIDRs in canonical text form (a single address is a /32 or /128).
    allowed_cidrs      text[]      NOT NULL DEFAULT '{}',
    scopes             text[]      NOT NULL,
    -- SPKI PEM of a P-256 key for private_key_jwt, if the client has one.
    public_key_pem     text,
    state              text        NOT NULL CHECK (state IN ('active', 'disabled')),
    -- Tokens issued before this instant are refused: disabling a client moves it to now(), so
    -- re-enabling never brings old tokens back.
    tokens_not_before  timestamptz NOT NULL DEFAULT 'epoch',
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- Revoked access tokens, kept until they would have expired anyway.
CREATE TABLE revoked_tokens (
    jti        uuid        PRIMARY KEY,
    client_id  uuid        NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX revoked_tokens_expiry ON revoked_tokens (expires_at);

-- jti values of private_key_jwt assertions already used, so that none is accepted twice.
CREATE TABLE used_assertions (
    client_id  uuid        NOT NULL,
    jti        text        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (client_id, jti)
);
CREATE INDEX used_assertions_expiry ON used_assertions (expires_at);
