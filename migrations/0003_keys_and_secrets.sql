-- Managed keys: material generated from the token's RNG and stored only sealed under a master-key
-- version (one row per key version). Destroyed keys stay as tombstones with their material erased.
CREATE TABLE keys (
    id                   uuid        PRIMARY KEY,
    client_id            uuid        NOT NULL,
    name                 text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    format               text        NOT NULL,
    length               integer     NOT NULL CHECK (length > 0),
    -- The caller's encryption context, canonical JSON: bound into every version's AAD, and kept
    -- so that scheduled rotation and master-key rewrap can seal without the caller.
    context              jsonb       NOT NULL DEFAULT '{}',
    state                text        NOT NULL CHECK (state IN
                             ('active', 'disabled', 'expired', 'pending_deletion', 'destroyed')),
    current_version      integer     NOT NULL CHECK (current_version > 0),
    rotation             text        NOT NULL CHECK (rotation IN ('manual', 'auto')),
    rotation_period_days integer     CHECK (rotation_period_days > 0),
    next_rotation_at     timestamptz,
    expires_at           timestamptz,
    deletion_due         timestamptz,
    created_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL,
    destroyed_at         timestamptz,
    CHECK (rotation = 'manual' OR rotation_period_days IS NOT NULL)
);
-- Names are unique per client among keys that still exist.
CREATE UNIQUE INDEX keys_name_per_client ON keys (client_id, name) WHERE state <> 'destroyed';
CREATE INDEX keys_rotation_due ON keys (next_rotation_at) WHERE rotation = 'auto' AND state = 'active';
CREATE INDEX keys_expiry_due ON keys (expires_at) WHERE state = 'active';
CREATE INDEX keys_deletion_due ON keys (deletion_due) WHERE state = 'pending_deletion';

CREATE TABLE key_versions (
    key_id     uuid        NOT NULL REFERENCES keys ON DELETE CASCADE,
    version    integer     NOT NULL CHECK (version > 0),
    mk_version integer     NOT NULL REFERENCES master_keys (version),
    -- iv || ciphertext || tag from the token; NULL once the key is destroyed.
    sealed     bytea,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE INDEX key_versions_mk ON key_versions (mk_version) WHERE sealed IS NOT NULL;

CREATE TABLE key_rotations (
    key_id       uuid        NOT NULL REFERENCES keys ON DELETE CASCADE,
    from_version integer     NOT NULL,
    to_version   integer     NOT NULL,
    reason       text        NOT NULL CHECK (reason IN ('manual', 'scheduled')),
    -- The client id that asked, or 'scheduler'.
    actor        text        NOT NULL,
    rotated_at   timestamptz NOT NULL
);
CREATE INDEX key_rotations_key ON key_rotations (key_id, rotated_at);

-- Secrets (e.g. third-party API keys): each version's value is sealed in-process under its own
-- data key, and that data key is sealed by the token.
CREATE TABLE secrets (
    id              uuid        PRIMARY KEY,
    client_id       uuid        NOT NULL,
    name            text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    state           text        NOT NULL CHECK (state IN ('active', 'pending_deletion', 'destroyed')),
    current_version integer     NOT NULL CHECK (current_version > 0),
    deletion_due    timestamptz,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    destroyed_at    timestamptz
);
CREATE UNIQUE INDEX secrets_name_per_client ON secrets (client_id, name) WHERE state <> 'destroyed';
CREATE INDEX secrets_deletion_due ON secrets (deletion_due) WHERE state = 'pending_deletion';

CREATE TABLE secret_versions (
    secret_id   uuid        NOT NULL REFERENCES secrets ON DELETE CASCADE,
    version     integer     NOT NULL CHECK (version > 0),
    mk_version  integer     NOT NULL REFERENCES master_keys (version),
    -- The data key sealed by the token (iv || ciphertext || tag); NULL once destroyed.
    wrapped_dek bytea,
    -- The value sealed in-process under the data key (nonce || ciphertext || tag); NULL once destroyed.
    sealed      bytea,
    -- The context the value was stored with, canonical JSON (only as AAD: readers must give it).
    context     jsonb       NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (secret_id, version)
);

-- Operations per client, key (nil UUID when none) and day, for usage statistics.
CREATE TABLE usage_daily (
    client_id uuid   NOT NULL,
    key_id    uuid   NOT NULL,
    operation text   NOT NULL,
    day       date   NOT NULL,
    count     bigint NOT NULL CHECK (count >= 0),
    PRIMARY KEY (client_id, key_id, operation, day)
);
