-- Step 5: master-key rotation that survives a crash at any point, a resumable rewrap job, and
-- versioned token-signing keys.

-- A rotation first records the next version as 'pending' (committed), then creates it on the
-- token, then makes it active. A crash leaves a pending row that the next rotation (or any
-- broker's maintenance pass) finishes; a version is never active before it is on the token.
ALTER TABLE master_keys DROP CONSTRAINT master_keys_state_check;
ALTER TABLE master_keys ADD CONSTRAINT master_keys_state_check
    CHECK (state IN ('pending', 'active', 'decrypt_only', 'retired', 'destroyed'));
ALTER TABLE master_keys ADD COLUMN retired_at timestamptz;
ALTER TABLE master_keys ADD COLUMN destroyed_at timestamptz;
CREATE UNIQUE INDEX master_keys_one_pending ON master_keys ((true)) WHERE state = 'pending';

-- Moving every stored blob (key versions, secret data keys) to the active master key. One job
-- runs at a time, whatever several brokers do; any broker works on it in batches, and what is
-- left is always "the rows not under the active version", so an interrupted job just goes on.
CREATE TABLE rewrap_jobs (
    id          bigserial   PRIMARY KEY,
    state       text        NOT NULL CHECK (state IN ('running', 'done')),
    -- 'officer', 'scheduler' or the admin client's id.
    started_by  text        NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    -- Blobs outside the active version when the job started, and blobs moved since.
    total       bigint      NOT NULL CHECK (total >= 0),
    rewrapped   bigint      NOT NULL DEFAULT 0 CHECK (rewrapped >= 0)
);
CREATE UNIQUE INDEX rewrap_jobs_one_running ON rewrap_jobs ((true)) WHERE state = 'running';
CREATE INDEX secret_versions_mk ON secret_versions (mk_version) WHERE wrapped_dek IS NOT NULL;

-- Token-signing key pairs (keybroker-sign-v<N>). One signs; one that was replaced stays in the
-- JWKS until every token it signed has expired ('retiring' until published_until), then is
-- 'retired' and no longer accepted.
CREATE TABLE signing_keys (
    version         integer     PRIMARY KEY CHECK (version > 0),
    token_label     text        NOT NULL UNIQUE,
    state           text        NOT NULL CHECK (state IN ('active', 'retiring', 'retired')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_until timestamptz
);
CREATE UNIQUE INDEX signing_keys_one_active ON signing_keys ((true)) WHERE state = 'active';
